"""The local stack as a whole: `eddy up` brings the parts up in order, `down` stops them, `status` reports."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil

from deploy import broker, components, object_store, redis_local
from deploy.environment import child_environment
from deploy.home_records import record_flink_cluster, record_store, recorded_flink_cluster, recorded_spark_cluster
from deploy.processes import ProcessTable, port_open
from deploy.settings import Settings, local_credentials, redact_url, stored_key
from features.errors import ConfigError, EddyError, ServiceError
from features.spec import PipelineSpec, load_spec
from features.waiting import poll
from streams.kafka import ensure_topics, group_lag, wait_for_broker
from streams.metrics import read_metrics

COMPONENT_DEADLINE_S = 120.0
# A job on a session cluster is compiled by a Flink client, then deployed to TaskManagers that each start
# Python workers before the first beat: on 2 cores beside three brokers and Spark, a submission alone took 74 s.
CLUSTER_JOB_DEADLINE_S = 300.0
FUSED = "features-fused"
# parts with no heartbeat of their own: alive is up (the Flink cluster's JobManager: alive and answering)
UNBEATING = ("supervisor", "prometheus", "spark-master", "spark-worker", "flink-jobmanager", "flink-taskmanager-")
# What the fused stage's part shows of its scoring (from the heartbeat it sends as the scorer stage).
SCORING_FIELDS = ("model_version", "device", "rollout", "challenger", "updates_accepted", "updates_refused",
                  "bad_records", "by_version")

# Parts stop in the reverse of this order, so consumers go before the broker they read.
START_ORDER = ("broker", "redis", "objectstore", "spark-master", "spark-worker", "flink-jobmanager")  # TaskManagers after


@dataclass
class UpReport:
    """What `up` did: each part's address, pid, start time and log, the topics it created, and the
    baseline model version when it published one."""

    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    topics_created: list[str] = field(default_factory=list)
    baseline: str | None = None  # the baseline model version, when this `up` published it
    settings: Settings | None = None  # the settings `up` ended with: signed in to the secure local stack


def private_settings(base: Settings, home: Path, **changes: Any) -> Settings:
    """Settings for a stack of its own in `home` (local broker and Redis on free loopback ports, the
    lakehouse under it), with base's model key written where its processes read it. Its broker and Redis
    make their own credentials (none of base's client settings apply to them)."""
    from deploy.processes import free_port
    from streams.kafka import KafkaConfig

    home.mkdir(parents=True, exist_ok=True)
    key_file = home / "model.key"
    key_file.touch(mode=0o600)
    key_file.write_bytes(base.model_key.get_secret_value() or stored_key(base.home))
    return base.model_copy(update=dict(
        home=home, kafka=KafkaConfig(f"127.0.0.1:{free_port()}"), kafka_config=None,
        redis_url=f"redis://127.0.0.1:{free_port()}/0", lakehouse=str(home / "lakehouse"), **changes))


def process_table(settings: Settings) -> ProcessTable:
    """The processes this EDDY_HOME started, recorded under its run folder, logs under its logs folder."""
    return ProcessTable(settings.run_dir, settings.logs_dir)


def up(settings: Settings, spec: PipelineSpec | None = None, with_components: bool = True,
       spark_cluster: bool = False, flink_cluster: bool = False) -> UpReport:
    """Start what is missing, wait for health, create the spec's topics, start the components
    (feature engine, writers; skipped with with_components=False). Safe to run again. With spark_cluster
    (or when EDDY_SPARK_MASTER names the one this home made), the local Spark master and worker too; with
    flink_cluster (or when EDDY_FLINK_CLUSTER names the one this home made), the Flink engine's session
    cluster at settings.flink_cluster, the job kept on it by the features-flink part."""
    spec = spec or settings.pipeline_spec()
    if settings.engine_workers > 1 and settings.engine != "native":
        raise ConfigError(f"--engine-workers {settings.engine_workers}: workers are the native engine's (--engine native); "
                          f"the {settings.engine} engine spreads its work itself")
    if settings.fused and settings.scorers > 1:
        raise ConfigError(f"--scorers {settings.scorers}: scorer replicas run apart from the engine; add --stages split "
                          "(the fused stage scores in the engine's own process)")
    table = process_table(settings)
    report = UpReport()
    b = broker.ensure_broker(settings, table)
    report.parts["broker"] = {"managed": b.managed, "address": b.address, "pid": b.pid,
                              "start_s": round(b.start_s, 2), "log": str(table.log_path("broker"))}
    controller = table.get(broker.CONTROLLER) if b.managed else None
    if controller is not None:  # the lone broker's own controller
        report.parts[broker.CONTROLLER] = {"managed": True, "address": controller.address, "pid": controller.pid,
                                           "start_s": round(b.controller_s, 2),
                                           "log": str(table.log_path(broker.CONTROLLER))}
    r = redis_local.ensure_redis(settings, table)
    report.parts["redis"] = {"managed": r.managed, "address": r.address, "pid": r.pid,
                             "start_s": round(r.start_s, 2), "log": str(table.log_path("redis"))}
    o = object_store.ensure_object_store(settings, table)
    if o is not None:
        report.parts[object_store.NAME] = {"managed": o.managed, "address": o.address, "pid": o.pid,
                                           "start_s": round(o.start_s, 2), "log": str(table.log_path(object_store.NAME))}
        if o.managed:
            record_store(settings.home, settings.lakehouse, settings.s3_endpoint)
            if o.start_s:  # started now, so empty (it keeps objects in memory): this home's models go back
                report.parts[object_store.NAME]["republished"] = len(settings.artifacts.republish())
    recorded = recorded_spark_cluster(settings.home)
    if spark_cluster or (recorded is not None and settings.spark_master == recorded["master"]):
        from deploy import spark_cluster as cluster

        s = cluster.ensure_spark_cluster(settings, table)
        settings = settings.with_overrides(spark_master=s.master)
        report.parts[cluster.MASTER] = {"managed": True, "address": s.master, "pid": s.pids[0], "start_s": round(s.start_s, 2),
                                        "log": str(table.log_path(cluster.MASTER)), "ui": s.ui}
        report.parts[cluster.WORKER] = {"managed": True, "address": s.master, "pid": s.pids[-1], "start_s": 0.0,
                                        "log": str(table.log_path(cluster.WORKER))}
    recorded_flink = recorded_flink_cluster(settings.home)
    if settings.engine == "flink" and settings.flink_cluster and (
            flink_cluster or (recorded_flink is not None and settings.flink_cluster == recorded_flink["rest"])):
        _start_flink_cluster(settings, table, report)
    settings = report.settings = local_credentials(settings)  # admin, where this home made the credentials
    if b.managed and not settings.insecure:
        broker.grant(settings, spec)
    if settings.monitoring:
        from deploy import prometheus_local

        p = prometheus_local.ensure_prometheus(settings, table)
        report.parts[prometheus_local.NAME] = {"managed": True, "address": p.url, "pid": p.pid,
                                               "start_s": round(p.start_s, 2),
                                               "log": str(table.log_path(prometheus_local.NAME))}
    # model-updates is kept forever: a scorer started after a week must still find the serving model
    report.topics_created = ensure_topics(settings.kafka, [spec.topics.model_updates], 1,
                                          configs={"retention.ms": "-1"})
    report.topics_created += ensure_topics(
        settings.kafka, [t for t in spec.topics.all() if t != spec.topics.model_updates], settings.partitions)
    if with_components:
        from models.updates import ensure_baseline

        report.baseline = ensure_baseline(settings.kafka, spec, settings.artifacts, settings.signing_key())
        _start_components(settings, spec, table, report)
    return report


def _start_flink_cluster(settings: Settings, table: ProcessTable, report: UpReport) -> None:
    """The Flink session cluster at settings.flink_cluster: its JobManager and TaskManagers, recorded in the
    home so that later commands (and the supervisor, which brings each back) find it."""
    from deploy import flink_cluster as cluster

    took = cluster.ensure_cluster(settings, table)
    record_flink_cluster(settings.home, settings.flink_cluster)
    for name in (cluster.JOBMANAGER, *(cluster.taskmanager_name(i) for i in range(1, settings.flink_taskmanagers + 1))):
        record = table.get(name)
        report.parts[name] = {"managed": True, "address": settings.flink_cluster, "pid": record.pid if record else None,
                              "start_s": round(took, 2) if name == cluster.JOBMANAGER else 0.0,
                              "log": str(table.log_path(name))}


def _start_components(settings: Settings, spec: PipelineSpec, table: ProcessTable, report: UpReport) -> None:
    """Have the supervisor run the wanted components and wait until each is healthy. A supervisor of
    other settings (another --engine, more scorers) is replaced: it stops its components first."""
    import redis

    from deploy import supervisor

    env = child_environment(settings)
    # The replica counts are left out: a running supervisor scales its scorers and workers to them, the rest
    # kept running
    config = hashlib.sha256(json.dumps(sorted((k, v) for k, v in env.items() if k.startswith("EDDY_")
                                              and k not in ("EDDY_SCORERS", "EDDY_ENGINE_WORKERS"))).encode())
    fingerprint, marker = config.hexdigest(), settings.run_dir / "supervisor.config"
    running = table.get(supervisor.NAME)
    if running is not None and running.alive() and _read(marker) != fingerprint:
        table.stop(supervisor.NAME, timeout_s=60)
        running = None
    wanted = components.wanted(settings)
    supervisor.write_scale(settings.run_dir, settings.scorers)
    supervisor.write_scale(settings.run_dir, settings.engine_workers, supervisor.WORKERS_FILE)
    retired = set(components.COMPONENTS) - {c.name for c in wanted}
    if running is not None and running.alive():  # it stops the scorers it no longer wants itself
        poll(lambda: not any((r := table.get(name)) is not None and r.alive() for name in retired),
             COMPONENT_DEADLINE_S)
    for other in retired:
        table.stop(other)  # left by a supervisor that was killed
    started_at = time.monotonic()
    if running is None or not running.alive():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)
        running = table.start(supervisor.NAME, components.argv(supervisor.NAME), env)
        report.parts[supervisor.NAME] = {"managed": True, "address": "", "pid": running.pid,
                                         "start_s": round(time.monotonic() - started_at, 2) or 0.01,
                                         "log": str(table.log_path(supervisor.NAME))}
    else:
        report.parts[supervisor.NAME] = {"managed": True, "address": "", "pid": running.pid, "start_s": 0.0,
                                         "log": str(table.log_path(supervisor.NAME))}
    client = redis.Redis.from_url(settings.redis_url)
    for comp in wanted:
        started = time.monotonic()
        deadline_s = CLUSTER_JOB_DEADLINE_S if comp.cluster_job and settings.flink_cluster else COMPONENT_DEADLINE_S
        record = _healthy(settings, spec, table, client, comp.name, deadline_s)
        took = time.monotonic() - started
        report.parts[comp.name] = {"managed": True, "address": "", "pid": record.pid,
                                   "start_s": round(took, 2) if took > 0.5 else 0.0,
                                   "log": str(table.log_path(comp.name))}


def _healthy(settings: Settings, spec: PipelineSpec, table: ProcessTable, client, name: str, deadline_s: float):
    """The component's record once the process the supervisor runs for it has sent a heartbeat;
    ServiceError with its last exit when it crash-loops, or when the deadline passes."""
    from deploy import supervisor
    from deploy.processes import last_error_line

    def check():
        if not (running := table.get(supervisor.NAME)) or not running.alive():
            raise ServiceError(f"the supervisor exited during start: "
                               f"{last_error_line(table.log_path(supervisor.NAME))} (log: {table.log_path(supervisor.NAME)})")
        state = supervisor.read_state(settings.run_dir).get(name, {})
        if state.get("crash_looping"):
            raise ServiceError(f"{name} keeps exiting ({state.get('last_reason')}); log: {table.log_path(name)}")
        record = table.get(name)
        return record if record is not None and record.alive() and _beats_from(client, spec, name, record.pid) else None

    record = poll(check, deadline_s)
    if record is None:
        state = supervisor.read_state(settings.run_dir).get(name, {})
        why = f" (last exit: {state['last_reason']})" if state.get("last_reason") else ""
        raise ServiceError(f"{name} did not become healthy within {deadline_s:.0f}s{why}; "
                           f"log: {table.log_path(name)}")
    return record


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _beats_from(client, spec: PipelineSpec, component: str, pid: int) -> bool:
    """Healthy once the process itself has sent a heartbeat (an old one may linger from a killed process)."""
    return any(b.get("pid") == pid for b in read_metrics(client, spec.name, _metric(component)))


def _metric(component: str) -> str:
    """The heartbeat name of a component: the stage it runs (features-faust, -flink and -native are all features)."""
    return component.split("-")[0] if component.startswith(("features-", "scorer-")) else component


def down(settings: Settings, timeout_s: float = 20.0) -> list[str]:
    """Stop every process this EDDY_HOME started: the supervisor first (it stops the components it
    runs), then what is left, consumers before the broker and Redis; returns the names stopped."""
    from deploy import supervisor

    table = process_table(settings)
    alive = [r.name for r in table.all() if r.alive()]
    stopped = [supervisor.NAME] if table.stop(supervisor.NAME, timeout_s * 3) else []
    # the components the supervisor stopped on its way out
    stopped += [name for name in alive if name != supervisor.NAME and table.get(name) is None]
    records = table.all()
    rank = {name: i for i, name in enumerate(START_ORDER)}
    records.sort(key=lambda r: rank.get(r.name, len(rank)), reverse=True)
    stopped += [r.name for r in records if not broker.is_node(r.name) and table.stop(r.name, timeout_s)]
    # The brokers last and together: one stopped after the others would wait for a quorum that is gone. A
    # lone broker's own controller after it, so the broker's controlled shutdown has a controller to ask.
    nodes = [r.name for r in records if broker.is_node(r.name) and r.name != broker.CONTROLLER]
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        stopped += [name for name, done in zip(nodes, pool.map(lambda n: table.stop(n, timeout_s), nodes),
                                               strict=True) if done]
    if table.stop(broker.CONTROLLER, timeout_s):
        stopped.append(broker.CONTROLLER)
    return stopped


def _pipeline_name(settings: Settings) -> str:
    return load_spec(settings.pipeline).name


def _sum_beats(beats: list[dict[str, Any]]) -> dict[str, Any]:
    """One line for all replicas of a component: counters summed, other fields from the first replica."""
    if not beats:
        return {"replicas": 0}
    # a Flink job's keeper beats beside the job's subtasks: they are the replicas
    out: dict[str, Any] = {"replicas": sum(1 for b in beats if not b.get("keeper"))}
    for beat in beats:
        for k, v in beat.items():
            if k in ("replica", "pid", "updated_at", "keeper"):
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
    full = "memory bound" in report["parts"]["redis"].get("note", "")
    store = settings.object_store
    if store is not None:
        report["parts"][object_store.NAME] = _part(started.get(object_store.NAME),
                                                   object_store.answers(store, object_store.bucket_of(settings), create=False),
                                                   store.endpoint or "s3.amazonaws.com", lakehouse=settings.lakehouse)
    client = redis.Redis.from_url(settings.redis_url)
    for name, record in started.items():
        if broker.is_node(name) and name != broker.NAME:  # the cluster's other brokers: alive and listening
            address = record.address.rpartition(":")
            listening = record.alive() and port_open(address[0], int(address[2]))
            report["parts"][name] = _part(record, listening, record.address)
        elif name not in report["parts"]:
            beats = read_metrics(client, _pipeline_name(settings), _metric(name)) if redis_up else []
            extra = _sum_beats(beats)
            if name.startswith(FUSED) and redis_up:  # it scores too: the model it serves, as a scorer's part shows it
                scoring = _sum_beats(read_metrics(client, _pipeline_name(settings), "scorer"))
                extra.update({k: v for k, v in scoring.items() if k in SCORING_FIELDS},
                             predictions=scoring.get("events", 0))
            beating = bool(beats) or name.startswith(UNBEATING)  # no heartbeat: alive is up
            if not beating and full:  # a full Redis refuses heartbeats too: alive and waiting is up
                beating, extra = True, {**extra, "note": "waiting for room in Redis (its heartbeat is refused)"}
            report["parts"][name] = _part(record, record.alive() and beating, record.address, **extra)

    _supervision(settings, report["parts"], started)
    _metrics_urls(settings, report["parts"])
    _identities(settings, report["parts"])
    if broker_up:
        try:
            report["lag"] = group_lag(settings.kafka, timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - status reports what it can, never dies on one probe
            report["lag"] = {"error": str(exc)}
    report["checked_at"] = time.time()
    return report


def _identities(settings: Settings, parts: dict[str, dict[str, Any]]) -> None:
    """Who each part is to Kafka (its principal) and whether it speaks TLS; the broker's and Redis's
    own security. On this home's secure local stack each stage is its role; elsewhere every part uses
    EDDY_KAFKA_CONFIG's identity."""
    from deploy.security import local_kafka_properties, principal

    local = settings.kafka_config is None and local_kafka_properties(settings.home, settings.kafka.bootstrap)
    shared = principal(settings.kafka.properties)
    for name, part in parts.items():
        comp = components.COMPONENTS.get(name)
        if comp is not None:
            part.update({"principal": f"User:{comp.role}", "tls": True} if local else shared)
    if "broker" in parts:
        parts["broker"]["tls"] = shared["tls"]
        parts["broker"]["security"] = settings.kafka.properties.get("security.protocol", "PLAINTEXT").upper()
    if "redis" in parts:
        parts["redis"]["tls"] = settings.redis_url.startswith("rediss://")
        parts["redis"]["users"] = "@" in settings.redis_url


def _metrics_urls(settings: Settings, parts: dict[str, dict[str, Any]]) -> None:
    """Where each part serves its Prometheus metrics, from the scrape target it wrote."""
    for path in (settings.run_dir / "targets").glob("*.json"):
        part = parts.get(path.stem)
        if part is None or part["state"] != "up":
            continue
        try:
            [entry] = json.loads(path.read_text())
            part["metrics_url"] = f"http://{entry['targets'][0]}/metrics"
        except (OSError, ValueError, KeyError, IndexError):
            continue
    prometheus = parts.get("prometheus")
    if prometheus is not None and prometheus["state"] == "up":
        prometheus["metrics_url"] = f"http://{prometheus['address']}/metrics"


def _supervision(settings: Settings, parts: dict[str, dict[str, Any]], started: dict) -> None:
    """Each part's restarts, last exit and crash loop as the supervisor saw them (restarts 0 for a part
    it does not watch); a part it is bringing back shows as down with its reason."""
    from deploy import supervisor

    states = supervisor.read_state(settings.run_dir)
    watching = supervisor.NAME in started and started[supervisor.NAME].alive()
    for name, state in states.items():
        part = parts.setdefault(name, _part(started.get(name), False, ""))
        part.update(restarts=state.get("restarts", 0), last_exit_code=state.get("last_exit_code"),
                    last_reason=state.get("last_reason"), crash_looping=bool(state.get("crash_looping")) and watching)
        if watching and state.get("state") in ("backoff", "crash-looping") and part["state"] == "down":
            part["note"] = f"restarting ({state['state']}): {state.get('last_reason')}"
    for part in parts.values():
        part.setdefault("restarts", 0)


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

    # redis-py types a reply as sync or async in one union; this client is the sync one
    info = cast("dict[str, Any]", redis.Redis.from_url(url, socket_timeout=2).info("memory"))
    out: dict[str, Any] = {"used_memory_mb": round(info["used_memory"] / 2**20, 2),
                           "maxmemory_mb": round(info.get("maxmemory", 0) / 2**20, 2),
                           "maxmemory_policy": info.get("maxmemory_policy")}
    if info.get("maxmemory") and info["used_memory"] >= info["maxmemory"] and info.get("maxmemory_policy") == "noeviction":
        out["note"] = "at its memory bound: writes are refused and the stages wait until memory is freed or maxmemory raised"
    return out
