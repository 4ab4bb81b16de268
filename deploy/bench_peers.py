"""`eddy bench --peers`: the same feature job through eddy's native engine and through two engines a user
might pick instead, Quix Streams (exactly once) and Bytewax (at least once), on one private stack.

One backlog on the pipeline's source topic is drained by each engine in turn, each into its own topic,
each alone on the machine; the peers run eddy's own per-event step (deploy/peer_jobs.py), so only the
engine differs. Per engine: rows/s from its first event to its last row visible to a read_committed
reader, CPU seconds of its process over that window, and a sample of its rows against eddy's."""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import confluent_kafka
import orjson

from deploy import components, stack
from deploy.measure import fill_backlog, reader, timestamps
from deploy.peer_jobs import QUIX_DEFAULT_COMMIT_S, Job
from deploy.processes import Record
from deploy.settings import Settings, child_environment
from features.spec import PipelineSpec, load_spec
from features.waiting import poll
from streams.kafka import KafkaConfig, ensure_topics

REPO = Path(__file__).resolve().parent.parent
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
INSTALL_HINT = ("the peer engines are not installed: run `make peers` (Quix Streams and Bytewax in .venv-peers, "
                "pinned in deploy/peers-requirements.txt)")
BACKLOG_SEED = 2  # the backlog's event ids are "b2-<n>", n from 1 (GeneratorConfig.id_prefix)
ENGINE = "features-native"  # eddy's side: its native feature engine alone, as `eddy up` runs it
RESTORED = "streams.engines.native_engine: restored "  # the engine's log line before its first batch
LAST_ROWS_GRACE_S = 5.0  # after an engine exits, how long its last committed rows may take to be read


@dataclass(frozen=True)
class Peer:
    """One peer run: its engine (deploy.peer_jobs.PEERS), its guarantee, and how often it commits."""

    name: str
    kind: str
    guarantee: str
    commit_interval_s: float = QUIX_DEFAULT_COMMIT_S
    snapshot_s: float = 5.0


PEERS = (Peer("quix", "quix", "exactly_once"),
         Peer("quix_50ms", "quix", "exactly_once", commit_interval_s=0.05),
         Peer("bytewax", "bytewax", "at_least_once"))


def peers_missing() -> str | None:
    """Why the peers cannot run on this machine (a line naming the fix), or None when they can."""
    if not PEERS_PYTHON.exists():
        return INSTALL_HINT
    check = subprocess.run([str(PEERS_PYTHON), "-c", "import quixstreams, bytewax"], capture_output=True)
    return INSTALL_HINT if check.returncode else None


class CpuSampler:
    """A process's user + system CPU seconds every 0.1 s while it runs, so the CPU of any window of its
    run can be read afterwards (its start-up and idle tail left out)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.samples: list[tuple[float, float]] = []
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                times = self._process.cpu_times()
            except psutil.Error:  # it exited
                return
            self.samples.append((time.time(), times.user + times.system))
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float, final: float | None) -> float:
        """CPU seconds from the last sample at or before `start` to the first at or after `end`; `final`
        (the process's own total at exit) when it exited before a sample after `end`."""
        before = max((cpu for at, cpu in self.samples if at <= start), default=0.0)
        after = [cpu for at, cpu in self.samples if at >= end]
        last = after[0] if after else (final if final is not None else self.samples[-1][1])
        return round(last - before, 2)


def connection(kafka: KafkaConfig) -> dict[str, str]:
    """The librdkafka connection properties the peers are given: the admin role's, as the bench's own."""
    return {"bootstrap.servers": kafka.bootstrap, **{k: str(v) for k, v in kafka.properties.items()}}


def drain(settings: Settings, topic: str, events: int, launch: Callable[[], Record],
          report: Path | None = None, first_event: Callable[[], float | None] = lambda: None,
          ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Launch an engine on the backlog and read `topic` until it holds a row per event (or the engine
    exited): (the measures, event_id -> row). The window starts at the engine's first event (a peer's
    report, or first_event()), not at its first visible row, which waits for its first commit."""
    received: dict[str, float] = {}
    rows: dict[str, bytes] = {}
    consumer = reader(settings.kafka, [topic], from_end=True)  # placed before the first row: none is missed
    record = launch()
    cpu = CpuSampler(record.pid)
    exited_at: list[float] = []

    def gone(_found: dict[str, int]) -> bool:
        """The engine exited and its last committed rows had time to be read."""
        if not exited_at and not record.alive():
            exited_at.append(time.time())
        return bool(exited_at) and time.time() - exited_at[0] > LAST_ROWS_GRACE_S

    timestamps(settings.kafka, topic, None, events, timeout_s=max(300.0, events / 100), received=received,
               done=gone, consumer=consumer, values=rows)
    if report is not None:  # a peer stops by itself once done: its report is written at exit
        poll(lambda: not record.alive(), 60.0, every_s=0.1)
    cpu.stop()
    own = json.loads(report.read_text()) if report is not None and report.exists() else {}
    if not received:
        return {"rows": 0, "peer": own}, rows
    first_row, last_row = min(received.values()) / 1000, max(received.values()) / 1000
    start = min(own.get("first_event_at") or first_event() or first_row, first_row)
    seconds = max(last_row - start, 1e-3)
    cpu_s = cpu.between(start, last_row, own.get("cpu_s"))
    return {"rows": len(rows), "seconds": round(seconds, 2), "events_per_s": round(len(rows) / seconds, 1),
            "first_row_after_first_event_s": round(first_row - start, 2), "cpu_s": cpu_s,
            "cpu_s_per_100k": round(cpu_s / len(rows) * 100_000, 2), "peer": own}, rows


def same_rows(reference: dict[str, bytes], other: dict[str, bytes], sample: list[str]) -> dict[str, Any]:
    """How many sampled rows equal eddy's (parsed JSON: event_id, key, event time, features, late)."""
    missing = [i for i in sample if i not in other]
    different = [i for i in sample if i in other and orjson.loads(other[i]) != orjson.loads(reference[i])]
    return {"sampled": len(sample), "equal": len(sample) - len(missing) - len(different),
            "missing": len(missing), "different": len(different), "examples": (different + missing)[:5]}


def restored_at(log: Path) -> float | None:
    """When eddy's engine last logged its partitions restored (epoch s): it takes its first batch right
    after, so this stands for its first event as a peer's own report does (deploy.logs' line format)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if RESTORED in line]
    if not lines:
        return None
    stamp = lines[-1].split(" INFO ", 1)[0]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logging writes it


def launch_eddy(settings: Settings) -> Record:
    """eddy's native feature engine alone, as `eddy up` runs it (its role's credentials, its commit interval)."""
    env = components.environment(settings, ENGINE, child_environment(settings))
    return stack.process_table(settings).start(ENGINE, components.argv(ENGINE), env)


def launch_peer(settings: Settings, spec: PipelineSpec, peer: Peer, sink: str, events: int,
                work: Path) -> Callable[[], Record]:
    """A function that starts the peer on the backlog in the peers' virtualenv; its job file (which
    holds the admin's credentials) readable by this user only."""
    work.mkdir(parents=True)
    job = Job(kafka=connection(settings.kafka), pipeline=str(settings.pipeline), source=spec.topics.source,
              sink=sink, group=f"peer-{peer.name}-{uuid.uuid4().hex[:6]}", events=events,
              state_dir=str(work / "state"), report=str(work / "report.json"),
              commit_interval_s=peer.commit_interval_s, snapshot_s=peer.snapshot_s)
    job_file = work / "job.json"
    job_file.touch(mode=0o600)
    job_file.write_text(json.dumps(asdict(job)))
    argv = [str(PEERS_PYTHON), "-m", "deploy.peer_jobs", peer.kind, str(job_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return lambda: stack.process_table(settings).start(f"peer-{peer.name}", argv, env, cwd=REPO)


def run_peers(base: Settings, *, events: int, sample: int, on_progress, peers: tuple[Peer, ...] = PEERS,
              keep: bool = False) -> dict[str, Any]:
    """Each engine drains the same backlog on one private stack; sample <= 0 compares every row."""
    home = Path(tempfile.mkdtemp(prefix="eddy-bench-peers-"))
    settings = stack.private_settings(base, home, engine="native")
    spec = load_spec(settings.pipeline)
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count() or 0}, "events": events, "partitions": settings.partitions}
    try:
        on_progress(f"starting a private stack in {home}")
        settings = stack.up(settings, spec, with_components=False).settings or settings
        # the peers' topics made now: a topic's leader is not elected yet just after its creation
        sinks = {peer.name: f"peer-{peer.name}-{uuid.uuid4().hex[:6]}" for peer in peers}
        ensure_topics(settings.kafka, list(sinks.values()), settings.partitions)
        now_ms = int(time.time() * 1000)
        fill_backlog(settings.kafka, spec.topics.source, events, seed=BACKLOG_SEED, start_ms=now_ms - 7_200_000,
                     span_ms=7_200_000)
        on_progress(f"backlog of {events:,} on {spec.topics.source}; eddy's native engine draining it")
        eddy, reference = drain(settings, spec.topics.features, events, lambda: launch_eddy(settings),
                                first_event=lambda: restored_at(stack.process_table(settings).log_path(ENGINE)))
        stack.process_table(settings).stop(ENGINE)
        engines = {"eddy": {"engine": "eddy native", "guarantee": spec.guarantee, "commit_interval_s":
                            settings.commit_interval_s or components.NATIVE_COMMIT_INTERVAL_S, **eddy,
                            "versions": {"confluent-kafka": version("confluent-kafka"),
                                         "librdkafka": confluent_kafka.libversion()[0]}}}
        ids = sorted(reference)
        chosen = ids if sample <= 0 or sample >= len(ids) else random.Random(0).sample(ids, sample)
        for peer in peers:
            on_progress(f"{peer.name} ({peer.guarantee}) draining the backlog")
            sink = sinks[peer.name]
            work = home / "peers" / peer.name
            measured, rows = drain(settings, sink, events, launch_peer(settings, spec, peer, sink, events, work),
                                   report=work / "report.json")
            engines[peer.name] = {"engine": peer.kind, "guarantee": peer.guarantee,
                                  "commit_interval_s": peer.commit_interval_s if peer.kind == "quix" else None,
                                  "snapshot_s": peer.snapshot_s if peer.kind == "bytewax" else None,
                                  **measured, "rows_equal": same_rows(reference, rows, chosen)}
        result["engines"] = engines
    finally:
        if not keep:
            stack.down(settings)
    return result
