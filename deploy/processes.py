"""Processes the local stack starts: launch detached with one log file each, record the pid, stop by pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import psutil

from features.errors import ConfigError, ServiceError
from features.waiting import poll


@dataclass(frozen=True)
class Record:
    """What run/<name>.json keeps about a started process, enough to find and stop it later."""

    name: str
    pid: int
    argv: list[str]
    log: str
    started_at: float
    address: str = ""
    created: float | None = None  # seconds from boot to its start (_since_boot): with the pid, its identity

    def alive(self) -> bool:
        return pid_matches(self.pid, self.created)


def _since_boot(proc: psutil.Process) -> float:
    """Seconds from boot to the process's start. Its creation time since the epoch is that plus the boot
    time, which moves whenever the wall clock is stepped (seen here: records of live processes taken
    for dead); this difference does not."""
    return proc.create_time() - psutil.boot_time()


def _created(pid: int) -> float | None:
    try:
        return _since_boot(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return None


def pid_matches(pid: int, created: float | None) -> bool:
    """True when pid runs (a zombie counts as gone) and is still the process we started: the same start,
    so no reused pid (within a second: the start is counted in clock ticks). A record of an older eddy
    holds its creation time since the epoch instead, compared as such."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if created is None:
            return True
        started = proc.create_time() if created > 1e9 else _since_boot(proc)
        return abs(started - created) < 2
    except psutil.NoSuchProcess:
        return False


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def listen_address(variable: str, listen: str, host: str, port: int, example: str) -> tuple[str, int]:
    """Where a local service binds: `listen` (the setting named `variable`, a loopback host:port other
    than the address clients use, for a port forward or a proxy in front of it), else host:port itself."""
    if not listen:
        return host, port
    bind_host, _, bind_port = listen.rpartition(":")
    if not is_loopback(bind_host) or int(bind_port) == port:
        raise ConfigError(f"{variable} {listen!r}: the local service binds a loopback host:port other than the "
                          f"one clients use ({host}:{port}), like {example}")
    return bind_host, int(bind_port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_holder(port: int) -> str:
    """A short description of who listens on port (pid and program) when the system tells, else ''."""
    try:
        listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr]
    except psutil.AccessDenied:  # some systems show other users' sockets to root only
        return ""
    for conn in listening:
        if conn.laddr.port == port and conn.pid is not None:
            try:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
            except psutil.NoSuchProcess:
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


def exit_status(record: Record) -> tuple[int | None, str]:
    """(exit code, reason) of a process this process started and that has ended; the code is negative
    for a signal, as subprocess has it. (None, "gone") for one another process started."""
    child = _CHILDREN.pop(record.pid, None)
    if child is None:
        return None, "gone"
    try:
        code = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        _CHILDREN[record.pid] = child
        return None, "gone"
    if code < 0:
        try:
            return code, f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return code, f"killed by signal {-code}"
    return code, f"exited with status {code}"


def stop_orphans(keep: Collection[int] = (), timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after timeout_s, the process groups of every child this process started
    and still holds (but those in `keep`): a supervisor leaves none behind, records or not."""
    children = [c for pid, c in list(_CHILDREN.items()) if pid not in keep and c.poll() is None]
    for child in children:
        _signal_group(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child.pid, signal.SIGKILL)
            child.wait(timeout=5)
        _CHILDREN.pop(child.pid, None)


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
            data = json.loads(path.read_text())
            # Keys of other versions (start_ticks before psutil) are left out: such a record is matched by pid.
            return Record(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})
        except (OSError, ValueError, TypeError, AttributeError):
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
        record = Record(name, proc.pid, list(argv), str(log), time.time(), address, _created(proc.pid))
        (self.run_dir / f"{name}.json").write_text(json.dumps(asdict(record)))
        return record

    def wait_healthy(self, record: Record, check: Callable[[], bool], deadline_s: float, what: str) -> float:
        """Poll check() until True; ServiceError naming the log if the process dies or the deadline passes."""
        start = time.monotonic()

        def healthy() -> bool:
            if not record.alive():
                _reap(record.pid)
                self.forget(record.name)
                raise ServiceError(f"{what} exited during start: {last_error_line(Path(record.log))} (log: {record.log})")
            return check()

        if not poll(healthy, deadline_s):
            self.stop(record.name)
            raise ServiceError(f"{what} did not become healthy within {deadline_s:.0f}s (log: {record.log})")
        return time.monotonic() - start

    def stop(self, name: str, timeout_s: float = 20.0) -> bool:
        """SIGTERM the process group, SIGKILL after timeout_s; True if something was stopped."""
        record = self.get(name)
        if record is None:
            return False
        # Polled rather than psutil.wait_procs: that waits out its whole timeout for a zombie whose parent
        # (another eddy process, or an init that does not reap) has not collected it yet.
        stopped = record.alive()
        if stopped:
            _signal_group(record.pid, signal.SIGTERM)
            if not poll(lambda: not record.alive(), timeout_s, every_s=0.1):
                _signal_group(record.pid, signal.SIGKILL)
                poll(lambda: not record.alive(), 5.0, every_s=0.05)
        _reap(record.pid)
        self.forget(name)
        return stopped

    def forget(self, name: str) -> None:
        (self.run_dir / f"{name}.json").unlink(missing_ok=True)


_RECORD_FIELDS = {f.name for f in fields(Record)}


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
