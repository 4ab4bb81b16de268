"""Processes the local stack starts: launch detached with one log file each, record the pid, stop by pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from features.errors import ServiceError


@dataclass(frozen=True)
class Record:
    """What run/<name>.json keeps about a started process, enough to find and stop it later."""

    name: str
    pid: int
    argv: list[str]
    log: str
    started_at: float
    address: str = ""
    start_ticks: int | None = None

    def alive(self) -> bool:
        return pid_matches(self.pid, self.start_ticks)


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def pid_matches(pid: int, start_ticks: int | None) -> bool:
    """True when pid runs and is still the process we started: same start time, so no reused pid."""
    ticks = _start_ticks(pid)
    return ticks is not None and (start_ticks is None or ticks == start_ticks)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_holder(port: int) -> str:
    """A short description of who listens on port (pid and program) when /proc tells, else ''."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return ""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in {f"socket:[{i}]" for i in inodes}:
                    exe = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    return f"pid {proc.name} ({Path(exe).name})"
        except OSError:
            continue
    return ""


# Popen objects of the processes this process started: kept so that they are reaped when they stop
# rather than left as zombies, and never garbage-collected while their process still runs.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _CHILDREN[pid] = child


class ProcessTable:
    """The processes one EDDY_HOME started, by name, under run/ with logs under logs/."""

    def __init__(self, run_dir: Path, logs_dir: Path) -> None:
        self.run_dir = run_dir
        self.logs_dir = logs_dir

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def get(self, name: str) -> Record | None:
        path = self.run_dir / f"{name}.json"
        try:
            return Record(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def all(self) -> list[Record]:
        if not self.run_dir.exists():
            return []
        records = (self.get(p.stem) for p in sorted(self.run_dir.glob("*.json")))
        return [r for r in records if r is not None]

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path | None = None,
        address: str = "",
    ) -> Record:
        """Launch argv in its own session, stdout and stderr appended to logs/<name>.log."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path(name)
        with open(log, "ab") as out:
            out.write(f"\n--- eddy starting {name} at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            out.flush()
            proc = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env), cwd=cwd, start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        record = Record(name, proc.pid, list(argv), str(log), time.time(), address, _start_ticks(proc.pid))
        (self.run_dir / f"{name}.json").write_text(json.dumps(asdict(record)))
        return record

    def wait_healthy(self, record: Record, check: Callable[[], bool], deadline_s: float, what: str) -> float:
        """Poll check() until True; ServiceError naming the log if the process dies or the deadline passes."""
        start = time.monotonic()
        while time.monotonic() - start < deadline_s:
            if not record.alive():
                _reap(record.pid)
                self.forget(record.name)
                raise ServiceError(f"{what} exited during start: {last_error_line(Path(record.log))} (log: {record.log})")
            if check():
                return time.monotonic() - start
            time.sleep(0.2)
        self.stop(record.name)
        raise ServiceError(f"{what} did not become healthy within {deadline_s:.0f}s (log: {record.log})")

    def stop(self, name: str, timeout_s: float = 20.0) -> bool:
        """SIGTERM the process group, SIGKILL after timeout_s; True if something was stopped."""
        record = self.get(name)
        if record is None:
            return False
        stopped = False
        if record.alive():
            stopped = True
            _signal_group(record.pid, signal.SIGTERM)
            end = time.monotonic() + timeout_s
            while record.alive() and time.monotonic() < end:
                time.sleep(0.1)
            if record.alive():
                _signal_group(record.pid, signal.SIGKILL)
                while record.alive() and time.monotonic() < end + 5:
                    time.sleep(0.05)
        _reap(record.pid)
        self.forget(name)
        return stopped

    def forget(self, name: str) -> None:
        (self.run_dir / f"{name}.json").unlink(missing_ok=True)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)


def last_error_line(log: Path) -> str:
    """The most telling line near the end of a log: the last ERROR/Exception line, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log written"
    tail = lines[-200:]
    for line in reversed(tail):
        if any(word in line for word in ("ERROR", "Exception", "FATAL", "Error:", "error:")):
            return line[:300]
    return tail[-1][:300] if tail else "no output"
