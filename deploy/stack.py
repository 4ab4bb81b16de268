"""The local stack as a whole: `eddy up` brings the parts up in order, `down` stops them, `status` reports."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from deploy import broker, components, redis_local
from deploy.processes import ProcessTable
from deploy.settings import Settings, child_environment, redact_url
from features.errors import EddyError
from features.spec import PipelineSpec, load_spec
from streams.kafka import ensure_topics, group_lag, wait_for_broker
from streams.metrics import read_metrics

COMPONENT_DEADLINE_S = 120.0

# Parts stop in the reverse of this order, so consumers go before the broker they read.
START_ORDER = ("broker", "redis")


@dataclass
class UpReport:
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    topics_created: list[str] = field(default_factory=list)
    baseline: str | None = None  # the baseline model version, when this `up` published it


def private_settings(base: Settings, home: Path, **changes: Any) -> Settings:
    """Settings for a stack of its own in `home` (local broker and Redis on free loopback ports, the
    lakehouse under it), with base's model key written where its processes read it."""
    from deploy.processes import free_port
    from streams.kafka import KafkaConfig

    home.mkdir(parents=True, exist_ok=True)
    key_file = home / "model.key"
    key_file.touch(mode=0o600)
    key_file.write_bytes(base.model_key.get_secret_value())
    return base.model_copy(update=dict(
        home=home, kafka=KafkaConfig(f"127.0.0.1:{free_port()}", base.kafka.properties),
        redis_url=f"redis://127.0.0.1:{free_port()}/0", lakehouse=str(home / "lakehouse"), **changes))


def process_table(settings: Settings) -> ProcessTable:
    return ProcessTable(settings.run_dir, settings.logs_dir)


def up(settings: Settings, spec: PipelineSpec | None = None, with_components: bool = True) -> UpReport:
    """Start what is missing, wait for health, create the spec's topics, start the components
    (feature engine, writers; skipped with with_components=False). Safe to run again."""
    spec = spec or load_spec(settings.pipeline)
    table = process_table(settings)
    report = UpReport()
    b = broker.ensure_broker(settings, table)
    report.parts["broker"] = {"managed": b.managed, "address": b.address, "pid": b.pid,
                              "start_s": round(b.start_s, 2), "log": str(table.log_path("broker"))}
    r = redis_local.ensure_redis(settings, table)
    report.parts["redis"] = {"managed": r.managed, "address": r.address, "pid": r.pid,
                             "start_s": round(r.start_s, 2), "log": str(table.log_path("redis"))}
    report.topics_created = ensure_topics(
        settings.kafka, spec.topics.all(), settings.partitions, single_partition=[spec.topics.model_updates]
    )
    if with_components:
        from models.updates import ensure_baseline

        report.baseline = ensure_baseline(settings.kafka, spec, settings.artifacts_dir, settings.model_key.get_secret_value())
        _start_components(settings, spec, table, report)
    return report


def _start_components(settings: Settings, spec: PipelineSpec, table: ProcessTable, report: UpReport) -> None:
    """Start each wanted component not running yet; stop the ones of another --engine."""
    import redis

    wanted = components.wanted(settings)
    for other in set(components.COMPONENTS) - {c.name for c in wanted}:
        table.stop(other)
    client = redis.Redis.from_url(settings.redis_url)
    for comp in wanted:
        record = table.get(comp.name)
        took = 0.0
        if record is None or not record.alive():
            record = table.start(comp.name, components.argv(comp.name), child_environment(settings))
            took = table.wait_healthy(record, lambda c=comp, r=record: _beats_from(client, spec, c.name, r.pid),
                                      COMPONENT_DEADLINE_S, comp.name)
        report.parts[comp.name] = {"managed": True, "address": "", "pid": record.pid, "start_s": round(took, 2),
                                   "log": str(table.log_path(comp.name))}


def _beats_from(client, spec: PipelineSpec, component: str, pid: int) -> bool:
    """Healthy once the process itself has sent a heartbeat (an old one may linger from a killed process)."""
    return any(b.get("pid") == pid for b in read_metrics(client, spec.name, _metric(component)))


def _metric(component: str) -> str:
    """The heartbeat name of a component: the stage it runs (features-faust, -flink and -native are all features)."""
    return component.split("-")[0] if component.startswith(("features-", "scorer-")) else component


def down(settings: Settings, timeout_s: float = 20.0) -> list[str]:
    """Stop every process this EDDY_HOME started, consumers first; returns the names stopped."""
    table = process_table(settings)
    records = table.all()
    rank = {name: i for i, name in enumerate(START_ORDER)}
    records.sort(key=lambda r: rank.get(r.name, len(rank)), reverse=True)
    return [r.name for r in records if table.stop(r.name, timeout_s)]


def _pipeline_name(settings: Settings) -> str:
    return load_spec(settings.pipeline).name


def _sum_beats(beats: list[dict[str, Any]]) -> dict[str, Any]:
    """One line for all replicas of a component: counters summed, other fields from the first replica."""
    if not beats:
        return {"replicas": 0}
    out: dict[str, Any] = {"replicas": len(beats)}
    for beat in beats:
        for k, v in beat.items():
            if k in ("replica", "pid", "updated_at"):
                continue
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = round(out.get(k, 0) + v, 1)
            else:
                out.setdefault(k, v)
    return out


def _rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process and its descendants (a component's JVM is its child)."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):  # one that exited meanwhile holds no memory
            total += proc.memory_info().rss
    return round(total / 2**20, 1) if total else None


def status(settings: Settings) -> dict[str, Any]:
    """The truth about each part, probed now: up or down, where, memory, topics and consumer lag."""
    import redis
    table = process_table(settings)
    report: dict[str, Any] = {"home": str(settings.home), "pipeline": str(settings.pipeline), "parts": {}}
    started = {r.name: r for r in table.all()}

    broker_up = True
    try:
        brokers = wait_for_broker(settings.kafka, timeout_s=3)
    except EddyError:
        broker_up, brokers = False, 0
    report["parts"]["broker"] = _part(started.get("broker"), broker_up, settings.kafka.bootstrap,
                                      brokers=brokers)
    redis_up = redis_local.ping(settings.redis_url)
    report["parts"]["redis"] = _part(started.get("redis"), redis_up, redact_url(settings.redis_url),
                                     **_redis_memory(settings.redis_url, redis_up))
    for name, record in started.items():
        if name not in report["parts"]:
            beats = read_metrics(redis.Redis.from_url(settings.redis_url), _pipeline_name(settings), _metric(name)) if redis_up else []
            extra = _sum_beats(beats)
            report["parts"][name] = _part(record, record.alive() and bool(beats), record.address, **extra)

    if broker_up:
        try:
            report["lag"] = group_lag(settings.kafka, timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - status reports what it can, never dies on one probe
            report["lag"] = {"error": str(exc)}
    report["checked_at"] = time.time()
    return report


def _part(record, up: bool, address: str, **extra: Any) -> dict[str, Any]:
    alive = record is not None and record.alive()
    part = {
        "state": "up" if up and (record is None or alive) else "down",
        "managed": record is not None,
        "address": address,
        "pid": record.pid if alive else None,
        "rss_mb": _rss_mb(record.pid) if alive else None,
        "log": record.log if record is not None else None,
    }
    if record is not None and not alive:
        part["note"] = "recorded process is gone"
    part.update(extra)
    return part


def _redis_memory(url: str, up: bool) -> dict[str, Any]:
    if not up:
        return {}
    import redis

    info = redis.Redis.from_url(url, socket_timeout=2).info("memory")
    return {"used_memory_mb": round(info["used_memory"] / 2**20, 2)}
