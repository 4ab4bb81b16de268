"""`eddy bench --peers`: the same feature job through eddy's native engine (exactly once, then at least
once) and through two engines a user might pick instead, Quix Streams (exactly once) and Bytewax (at least
once), on one private stack.

One backlog (the same events, keys and partitions; a copy on a source topic of its own per engine) is
drained by each engine in turn, each into its own topic, each alone on the machine; then, with the engine
still running, a fixed load of fresh events goes to its source. The peers run eddy's own per-event step
(deploy/peer_jobs.py), so only the engine differs. Per engine: rows/s from its first event to its last row
visible to a read_committed reader, CPU seconds of its process over that window, a sample of its rows
against eddy's, and at the fixed load each event's visible latency (when its row reached a read_committed
reader, wall clock, minus its source record's Kafka timestamp)."""

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
from deploy.environment import child_environment, inherited_environment
from deploy.measure import TimedLoad, backlog_start, fill_backlog, percentiles, reader, timed_load, timestamps
from deploy.peer_jobs import QUIX_DEFAULT_COMMIT_S, Job
from deploy.processes import Record
from deploy.settings import Settings
from features.spec import PipelineSpec, load_spec
from streams.kafka import KafkaConfig, ensure_topics

REPO = Path(__file__).resolve().parent.parent
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
INSTALL_HINT = ("the peer engines are not installed: run `make peers` (Quix Streams and Bytewax in .venv-peers, "
                "pinned in deploy/peers-requirements.txt)")
BACKLOG_SEED = 2  # the backlog's event ids are "b2-<n>", n from 1 (GeneratorConfig.id_prefix)
BACKLOG_SPAN_MS = 7_200_000  # its event times: over the last 2 hours
ENGINE = "features-native"  # eddy's side: its native feature engine alone, as `eddy up` runs it
RESTORED = "streams.engines.native_engine: restored "  # the engine's log line before its first batch
LAST_ROWS_GRACE_S = 5.0  # after an engine exits, how long its last committed rows may take to be read
LOAD_RATE, LOAD_SECONDS = 2_000, 15.0  # the fixed load after each drain: events/s, seconds
AT_LEAST_ONCE = "alo"  # eddy's at-least-once run: its pipeline's name and topics end with "-alo"


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


def drain(settings: Settings, spec: PipelineSpec, topic: str, events: int, launch: Callable[[], Record],
          load: tuple[int, float], source: str | None = None, report: Path | None = None,
          first_event: Callable[[], float | None] = lambda: None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Launch an engine on the backlog and read `topic` until it holds a row per event (or the engine
    exited); then, the engine still running, the fixed load `load` (events/s, seconds) to `source` (else
    the spec's); then stop it: (the measures, event_id -> row of the backlog). The drain's window starts
    at the engine's first event (a peer's report, or first_event()), not at its first visible row, which
    waits for its first commit."""
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
    rate, seconds = load
    timed = (timed_load(settings, spec, topic, rate, seconds, source=source)
             if rate > 0 and len(rows) >= events and record.alive() else None)
    started_at = first_event()  # eddy's log line, read before a restart could add another
    stack.process_table(settings).stop(record.name)  # a peer writes its report as it stops
    cpu.stop()
    own = json.loads(report.read_text()) if report is not None and report.exists() else {}
    at_load = None if timed is None else load_measures(timed, rate, seconds)
    if not received:
        return {"rows": 0, "peer": own, "load": at_load}, rows
    first_row, last_row = min(received.values()) / 1000, max(received.values()) / 1000
    start = min(own.get("first_event_at") or started_at or first_row, first_row)
    seconds_drained = max(last_row - start, 1e-3)
    cpu_s = cpu.between(start, last_row, own.get("cpu_s"))
    return {"rows": len(rows), "seconds": round(seconds_drained, 2),
            "events_per_s": round(len(rows) / seconds_drained, 1),
            "first_row_after_first_event_s": round(first_row - start, 2), "cpu_s": cpu_s,
            "cpu_s_per_100k": round(cpu_s / len(rows) * 100_000, 2), "load": at_load, "peer": own}, rows


def load_measures(load: TimedLoad, rate: int, seconds: float) -> dict[str, Any]:
    """The fixed load as the engine's output showed it: how many of its events got a row, how many of those
    rows were late, and the rows' visible latency."""
    late = sum(1 for value in load.values.values() if orjson.loads(value).get("late"))
    return {"rate": rate, "seconds": seconds, "events": load.count, "seen": len(load.received), "late": late,
            "visible_ms": percentiles(load.visible_ms())}


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


def spec_copy(settings: Settings, spec: PipelineSpec, suffix: str) -> Path:
    """The pipeline spec under another name, every topic of it but the labels' its own (`suffix` added),
    written into the bench's home: an eddy run on it starts afresh after another on the original, with
    its own consumer group, transactional ids and changelog topic (all named by the spec's stage id,
    features.spec.stage_id), its own dedupe keys in Redis (streams.dedupe: by the spec's name), and its
    own source topic, where the other run's fixed load is not."""
    import yaml

    data = yaml.safe_load(Path(settings.pipeline).read_text())
    t = spec.topics
    data["name"] = f"{spec.name}-{suffix}"
    data["source"]["topic"] = f"{t.source}-{suffix}"
    data["topics"] = {role: f"{topic}-{suffix}" for role, topic in (
        ("features", t.features), ("predictions", t.predictions), ("dlq", t.dlq), ("model_updates", t.model_updates))}
    path = settings.home / f"pipeline-{suffix}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def allow(settings: Settings, spec: PipelineSpec) -> None:
    """On the secure stack: the roles get `spec`'s Kafka ACLs too (added to the original spec's), and the
    engine's role its Redis keys (in place of the original spec's, whose run is over)."""
    if settings.insecure:
        return
    from deploy import broker
    from deploy.access import redis_acls
    from streams.stores import redis_client

    broker.grant(settings, spec)
    role = components.COMPONENTS[ENGINE].role
    redis_client(settings.redis_url).execute_command("ACL", "SETUSER", role, *redis_acls(spec)[role].split())


def launch_eddy(settings: Settings) -> Record:
    """eddy's native feature engine alone, as `eddy up` runs it (its role's credentials, its commit interval)."""
    env = components.environment(settings, ENGINE, child_environment(settings))
    return stack.process_table(settings).start(ENGINE, components.argv(ENGINE), env)


def launch_peer(settings: Settings, peer: Peer, source: str, sink: str, work: Path) -> Callable[[], Record]:
    """A function that starts the peer on `source` in the peers' virtualenv, running until stopped; its job
    file (which holds the admin's credentials) readable by this user only."""
    work.mkdir(parents=True)
    job = Job(kafka=connection(settings.kafka), pipeline=str(settings.pipeline), source=source,
              sink=sink, group=f"peer-{peer.name}-{uuid.uuid4().hex[:6]}",
              state_dir=str(work / "state"), report=str(work / "report.json"),
              commit_interval_s=peer.commit_interval_s, snapshot_s=peer.snapshot_s)
    job_file = work / "job.json"
    job_file.touch(mode=0o600)
    job_file.write_text(json.dumps(asdict(job)))
    argv = [str(PEERS_PYTHON), "-m", "deploy.peer_jobs", peer.kind, str(job_file)]
    env = inherited_environment({"PYTHONPATH": str(REPO)})
    return lambda: stack.process_table(settings).start(f"peer-{peer.name}", argv, env, cwd=REPO)


def run_peers(base: Settings, *, events: int, sample: int, on_progress, peers: tuple[Peer, ...] = PEERS,
              load: tuple[int, float] = (LOAD_RATE, LOAD_SECONDS), keep: bool = False) -> dict[str, Any]:
    """Each engine drains the same backlog on one private stack, then takes the fixed load `load` (events/s,
    seconds; a rate of 0: none); sample <= 0 compares every row."""
    home = Path(tempfile.mkdtemp(prefix="eddy-bench-peers-"))
    settings = stack.private_settings(base, home, engine="native")
    spec = load_spec(settings.pipeline)
    alo_pipeline = spec_copy(settings, spec, AT_LEAST_ONCE)
    alo_spec = load_spec(alo_pipeline)
    rate, seconds = load
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count() or 0}, "events": events,
                              "partitions": settings.partitions, "load": {"rate": rate, "seconds": seconds}}
    try:
        on_progress(f"starting a private stack in {home}")
        settings = stack.up(settings, spec, with_components=False).settings or settings
        alo = settings.model_copy(update={"pipeline": alo_pipeline, "guarantee": "at_least_once"})
        # every engine's topics made now: a topic's leader is not elected yet just after its creation
        sinks = {peer.name: f"peer-{peer.name}-{uuid.uuid4().hex[:6]}" for peer in peers}
        sources = {name: f"{sink}-in" for name, sink in sinks.items()}
        t = alo_spec.topics
        ensure_topics(settings.kafka, [*sinks.values(), *sources.values(), t.source, t.features, t.dlq],
                      settings.partitions)
        # 2 h of event times ending now, the last one included: no fixed load's event (its times are the wall
        # clock's, later) is late against a card's backlog
        start_ms = backlog_start(events, BACKLOG_SEED, int(time.time() * 1000), BACKLOG_SPAN_MS)

        def backlog(topic: str) -> None:
            """The backlog: the same events each time (seed, times), so the same keys in the same partitions."""
            fill_backlog(settings.kafka, topic, events, seed=BACKLOG_SEED, start_ms=start_ms, span_ms=BACKLOG_SPAN_MS)

        def eddy_log_restored() -> float | None:
            return restored_at(stack.process_table(settings).log_path(ENGINE))

        commit_s = settings.commit_interval_s or components.NATIVE_COMMIT_INTERVAL_S
        versions = {"confluent-kafka": version("confluent-kafka"), "librdkafka": confluent_kafka.libversion()[0]}
        backlog(spec.topics.source)
        on_progress(f"backlog of {events:,} on {spec.topics.source}; eddy's native engine (exactly once) draining "
                    f"it, then {rate:,} events/s for {seconds:g} s")
        eddy, reference = drain(settings, spec, spec.topics.features, events, lambda: launch_eddy(settings), load,
                                first_event=eddy_log_restored)
        engines = {"eddy": {"engine": "eddy native", "guarantee": spec.guarantee, "commit_interval_s": commit_s,
                            **eddy, "versions": versions}}
        ids = sorted(reference)
        chosen = ids if sample <= 0 or sample >= len(ids) else random.Random(0).sample(ids, sample)
        backlog(alo_spec.topics.source)
        allow(settings, alo_spec)  # the engine's role given the copy's keys, now that the first run is over
        on_progress(f"eddy's native engine at least once (pipeline {alo_spec.name}) on its copy, {t.source}")
        measured, rows = drain(alo, alo_spec, t.features, events, lambda: launch_eddy(alo), load,
                               first_event=eddy_log_restored)
        engines[f"eddy_{AT_LEAST_ONCE}"] = {"engine": "eddy native", "guarantee": "at_least_once",
                                            "commit_interval_s": commit_s, **measured,
                                            "rows_equal": same_rows(reference, rows, chosen), "versions": versions}
        for peer in peers:
            sink, source = sinks[peer.name], sources[peer.name]
            backlog(source)
            on_progress(f"{peer.name} ({peer.guarantee}) draining its copy of the backlog, then the load")
            work = home / "peers" / peer.name
            measured, rows = drain(settings, spec, sink, events, launch_peer(settings, peer, source, sink, work),
                                   load, source=source, report=work / "report.json")
            engines[peer.name] = {"engine": peer.kind, "guarantee": peer.guarantee,
                                  "commit_interval_s": peer.commit_interval_s if peer.kind == "quix" else None,
                                  "snapshot_s": peer.snapshot_s if peer.kind == "bytewax" else None,
                                  **measured, "rows_equal": same_rows(reference, rows, chosen)}
        result["engines"] = engines
        result["goals"] = goals(engines)
    finally:
        if not keep:
            stack.down(settings)
    return result


# The goals: (what, numerator engine, denominator engine, at least)
GOALS = (("eddy exactly once / Bytewax at least once, events/s", "eddy", "bytewax", 1.5),
         ("eddy exactly once / Quix exactly once (5 s commits), events/s", "eddy", "quix", 4.0),
         ("eddy exactly once / Quix exactly once (50 ms commits), events/s", "eddy", "quix_50ms", 4.0),
         ("eddy at least once / Bytewax at least once, events/s", f"eddy_{AT_LEAST_ONCE}", "bytewax", 2.0))


def goals(engines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal's ratio of drain rates, and whether it holds; and per guarantee whether eddy's visible
    p99 at the fixed load is below every peer's with that guarantee."""
    out: list[dict[str, Any]] = []
    for what, top, bottom, least in GOALS:
        if top in engines and bottom in engines and engines[bottom].get("events_per_s"):
            ratio = round(engines[top].get("events_per_s", 0) / engines[bottom]["events_per_s"], 2)
            out.append({"goal": what, "ratio": ratio, "at_least": least, "met": ratio >= least})

    def p99(name: str) -> float | None:
        load = engines[name].get("load") or {}
        return (load.get("visible_ms") or {}).get("p99")

    for ours in ("eddy", f"eddy_{AT_LEAST_ONCE}"):
        if ours not in engines:
            continue
        guarantee = engines[ours]["guarantee"]
        theirs = {name: p99(name) for name, run in engines.items()
                  if not name.startswith("eddy") and run["guarantee"] == guarantee}
        mine = p99(ours)
        out.append({"goal": f"{ours} visible p99 below every {guarantee} peer's", "p99_ms": mine, "peers_p99_ms": theirs,
                    "met": mine is not None and bool(theirs) and all(v is not None and mine < v for v in theirs.values())})
    return out
