"""The long-running parts `eddy up` starts beside the broker and Redis, each as `eddy run NAME`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException

from deploy.security import kafka_client_file, local_kafka_properties, local_redis_url, redis_url_file
from deploy.settings import MAX_REPLICAS, Settings
from features.spec import PipelineSpec
from streams.engines.config import EngineConfig

if TYPE_CHECKING:
    from streams.telemetry import StageMetrics

# The native engine commits every 50 ms: each transaction costs the broker ~5 ms of CPU here, so
# 20 a second per stage keeps it near a tenth of a core, against records waiting 25 ms on average.
NATIVE_COMMIT_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Component:
    """A long-running part of the stack: its name (also `eddy run NAME`), the function its process
    runs, and the settings under which the stack wants it (see wanted())."""

    name: str
    run: Callable[[Settings, PipelineSpec], None]   # runs in the component's own process until SIGTERM
    engine: str | None = None                        # only started with this --engine
    ingest: bool = False                             # lakehouse ingestion: only when settings.ingest
    retrain: bool = False                            # continuous retraining: only when a policy is set
    replica: int | None = None                       # scorer replicas: started while replica < settings.scorers
    worker: int | None = None                        # native feature-stage workers: while worker < settings.engine_workers
    signs: bool = False                              # publishes models: the only ones given the private key
    role: str = "admin"                              # its Kafka principal and Redis user (deploy.access)
    fused: bool | None = None                        # only when the online path is fused (True) or split (False)
    cluster_job: bool = False                        # submits its job to the Flink session cluster when one is set


def engine_config(settings: Settings, spec: PipelineSpec, **defaults) -> EngineConfig:
    """The engine's config: `defaults` are the engine's own (EDDY_COMMIT_INTERVAL wins over its interval)."""
    if settings.commit_interval_s is not None:
        defaults["commit_interval_s"] = settings.commit_interval_s
    return EngineConfig(kafka=settings.kafka, spec=spec, redis_url=settings.redis_url,
                        data_dir=settings.engine_dir, partitions=settings.partitions,
                        jars_dir=settings.jars_dir, **defaults)


def serve_metrics(settings: Settings, spec: PipelineSpec, stage: str, part: str) -> StageMetrics | None:
    """The part's StageMetrics, served on /metrics and /ready (EDDY_METRICS_PORT, or any free loopback
    port) until the process exits, and named to the local Prometheus through run/targets/; None with
    EDDY_METRICS=off (the stage then counts nothing but its heartbeat)."""
    import atexit

    if not settings.metrics:
        return None

    from streams.telemetry import MetricsServer, StageMetrics

    metrics = StageMetrics(spec.name, stage)
    host = "0.0.0.0" if settings.metrics_port else "127.0.0.1"  # a fixed port is for a cluster's scrapers
    server = MetricsServer(metrics, part, ready=kafka_reachable(settings), host=host, port=settings.metrics_port,
                           targets_dir=settings.run_dir / "targets")
    atexit.register(server.close)
    return metrics


def kafka_reachable(settings: Settings, every_s: float = 5.0) -> Callable[[], bool]:
    """/ready's answer: the brokers answered a metadata request within the last `every_s` seconds
    (asked when probed, at most once per `every_s`), so a stage that cannot reach Kafka is not ready."""
    import time

    from streams.kafka import admin

    client = admin(settings.kafka)
    last = {"at": -every_s, "ok": False}

    def ready() -> bool:
        now = time.monotonic()
        if now - last["at"] >= every_s:
            try:
                last["ok"] = bool(client.list_topics(timeout=2).brokers)
            except KafkaException:
                last["ok"] = False
            last["at"] = now
        return bool(last["ok"])

    return ready


def _faust(settings: Settings, spec: PipelineSpec) -> None:
    from streams.engines.faust_engine import run_worker

    config = engine_config(settings, spec)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    sys.argv = [sys.argv[0], "worker"]  # Faust's worker parses argv
    run_worker(config, metrics=serve_metrics(settings, spec, "features", "features-faust"))


def _online_writer(settings: Settings, spec: PipelineSpec) -> None:
    import signal
    import threading

    from features.feast_repo import skip_torch_import

    skip_torch_import()  # this process never uses torch
    from streams.online_writer import run_online_writer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the batch in hand, then leave the group
    run_online_writer(settings.kafka, spec, settings.redis_url, feast_dir(settings), stop.is_set,
                      metrics=serve_metrics(settings, spec, "online-writer", "online-writer"))


def _scorer(replica: int) -> Callable[[Settings, PipelineSpec], None]:
    def run(settings: Settings, spec: PipelineSpec) -> None:
        from models.scorer import ScorerConfig, run_scorer

        interval: dict[str, Any] = ({} if settings.commit_interval_s is None
                                    else {"commit_interval_s": settings.commit_interval_s})
        run_scorer(ScorerConfig(settings.kafka, spec, settings.redis_url, settings.device,
                                settings.trusted_keys(), replica=replica,
                                drift_window=settings.drift_window, store=settings.object_store, **interval),
                   metrics=serve_metrics(settings, spec, "scorer", f"scorer-{replica}"))

    return run


def feast_dir(settings: Settings) -> Path:
    """The Feast repo (feature_store.yaml, registry) of this EDDY_HOME."""
    return settings.home / "feast"


def _lakehouse(settings: Settings, spec: PipelineSpec) -> None:
    from deploy.lake import run_ingest_component

    run_ingest_component(settings, spec, metrics=serve_metrics(settings, spec, "lakehouse", "lakehouse"))


def _retrainer(settings: Settings, spec: PipelineSpec) -> None:
    from deploy.lake import run_retrain_component

    serve_metrics(settings, spec, "retrainer", "retrainer")
    run_retrain_component(settings, spec)


def _rollouts(settings: Settings, spec: PipelineSpec) -> None:
    from deploy.rollouts import run_judge_component

    serve_metrics(settings, spec, "rollouts", "rollouts")
    run_judge_component(settings, spec)


def _native(worker: int) -> Callable[[Settings, PipelineSpec], None]:
    def run(settings: Settings, spec: PipelineSpec) -> None:
        from streams.engines.native_engine import run_native

        run_native(engine_config(settings, spec, batch_size=5000, batch_wait_s=0.1,
                                 commit_interval_s=NATIVE_COMMIT_INTERVAL_S), worker=worker,
                   metrics=serve_metrics(settings, spec, "features", worker_name("features-native", worker)))

    return run


def _fused(worker: int) -> Callable[[Settings, PipelineSpec], None]:
    def run(settings: Settings, spec: PipelineSpec) -> None:
        from models.fused import run_fused
        from models.scorer import ScorerConfig

        run_fused(engine_config(settings, spec, batch_size=5000, batch_wait_s=0.1,
                                commit_interval_s=NATIVE_COMMIT_INTERVAL_S),
                  ScorerConfig(settings.kafka, spec, settings.redis_url, settings.device, settings.trusted_keys(),
                               replica=worker, drift_window=settings.drift_window, store=settings.object_store),
                  feast_dir(settings), metrics=serve_metrics(settings, spec, "features", worker_name("features-fused", worker)))

    return run


def worker_name(stage: str, worker: int) -> str:
    """Feature-stage worker `worker`'s part name: the stage's own for the first, then stage-1, stage-2, ..."""
    return stage if worker == 0 else f"{stage}-{worker}"


def component_named(name: str) -> str:
    """The component `eddy run NAME` means: a feature-stage worker's index 0 is the stage's own name too
    (features-native-0 is features-native), so a StatefulSet's pods each run `<stage>-<pod index>`."""
    stage, _, index = name.rpartition("-")
    return stage if index == "0" and stage in COMPONENTS and COMPONENTS[stage].worker == 0 else name


def scorer_name(replica: int) -> str:
    return f"scorer-{replica}"


def stage_name(settings: Settings) -> str:
    """The part that computes features in this stack (the one `--engine-workers N` scales)."""
    return "features-fused" if settings.fused else f"features-{settings.engine}"


def _flink(settings: Settings, spec: PipelineSpec) -> None:
    import threading

    from streams.engines.flink_job import run_job

    metrics = serve_metrics(settings, spec, "features", "features-flink")
    if metrics is not None:  # the job's Python functions run in workers of their own: their counts come by Redis
        threading.Thread(target=mirror_flink_counts, args=(settings, spec, metrics), name="flink-counts",
                         daemon=True).start()
    config = engine_config(settings, spec)
    if settings.flink_cluster:  # the job runs on the session cluster; this process keeps it running
        from deploy.flink_keeper import keep_job

        keep_job(settings, spec, config.app_id)
        return
    run_job(config)


def mirror_flink_counts(settings: Settings, spec: PipelineSpec, metrics: StageMetrics, every_s: float = 1.0) -> None:
    """Bring the metrics of the Flink job's process up to the counts its functions beat to Redis (summed
    over its subtasks): records in (partition "all": a subtask does not report per partition), out,
    duplicates and dead letters by reason, about once a second."""
    import time

    from redis.exceptions import RedisError

    from streams.metrics import read_metrics
    from streams.stores import redis_client

    client = redis_client(settings.redis_url)
    source, features = spec.topics.source, spec.topics.features
    while True:
        try:
            beats = [b for b in read_metrics(client, spec.name, "features", max_age_s=60) if b.get("engine") == "flink"]
        except RedisError:  # Redis away: the counts catch up on its return
            metrics.redis_errors.inc()
            beats = []
        totals: dict[str, int] = {}
        for beat in beats:
            for name, value in beat.items():
                if name in ("valid", "dlq", "duplicates") or name.startswith("refused_"):
                    totals[name] = totals.get(name, 0) + int(value)
        if totals:
            seen = totals.get("valid", 0) + totals.get("dlq", 0) + totals.get("duplicates", 0)
            metrics.total(metrics.records_in.labels(spec.name, "features", source, "all"), seen)
            metrics.total(metrics.records_out.labels(spec.name, "features", features), totals.get("valid", 0))
            metrics.total(metrics.duplicates, totals.get("duplicates", 0))
            metrics.refusals({n.removeprefix("refused_"): v for n, v in totals.items() if n.startswith("refused_")})
        time.sleep(every_s)


COMPONENTS: dict[str, Component] = {
    c.name: c for c in (
        Component("features-faust", _faust, engine="faust", role="features"),
        Component("features-flink", _flink, engine="flink", role="features", cluster_job=True),
        *(Component(worker_name("features-native", i), _native(i), engine="native", role="features", fused=False,
                    worker=i) for i in range(MAX_REPLICAS)),
        *(Component(worker_name("features-fused", i), _fused(i), engine="native", role="fused", fused=True, worker=i)
          for i in range(MAX_REPLICAS)),
        Component("online-writer", _online_writer, role="online-writer", fused=False),
        *(Component(scorer_name(i), _scorer(i), replica=i, role="scorer", fused=False) for i in range(MAX_REPLICAS)),
        Component("lakehouse", _lakehouse, ingest=True, role="lakehouse"),
        Component("retrainer", _retrainer, retrain=True, signs=True, role="publisher"),
        Component("rollouts", _rollouts, ingest=True, signs=True, role="publisher"),
    )
}


def wanted(settings: Settings) -> list[Component]:
    """The components this stack runs, in start order."""
    return [c for c in COMPONENTS.values()
            if c.engine in (None, settings.engine) and (c.replica is None or c.replica < settings.scorers)
            and (c.worker is None or c.worker < settings.engine_workers)
            and c.fused in (None, settings.fused)
            and (not c.ingest or settings.ingest)
            and (not c.retrain or (settings.ingest and retraining(settings)))]


def retraining(settings: Settings) -> bool:
    """Whether continuous retraining is configured (any of its three triggers)."""
    return bool(settings.retrain_every_labels or settings.retrain_every_s or settings.retrain_on_drift)


def environment(settings: Settings, name: str, env: Mapping[str, str]) -> dict[str, str]:
    """`env` for component `name`: on this home's secure local stack, its role's Kafka client file and
    Redis URL (never the admin's); and one that does not publish models gets the trusted public keys
    (EDDY_MODEL_TRUST) and neither the private key nor a way to find it."""
    comp = COMPONENTS[name]
    out = dict(env)
    if settings.kafka_config is None and local_kafka_properties(settings.home, settings.kafka.bootstrap):
        out["EDDY_KAFKA_CONFIG"] = str(kafka_client_file(settings.home, comp.role))
    raw = env.get("EDDY_REDIS_URL", settings.redis_url)
    if local_redis_url(settings.home, _without_user(raw)) is not None:
        out["EDDY_REDIS_URL"] = redis_url_file(settings.home, comp.role).read_text().strip()
    if comp.signs:
        return out
    trusted = env.get("EDDY_MODEL_TRUST") or ",".join(settings.trusted_keys().public_hex())
    return {**{k: v for k, v in out.items() if k != "EDDY_MODEL_KEY"}, "EDDY_MODEL_TRUST": trusted}


def _without_user(url: str) -> str:
    """`url` without its user and password (the supervisor's own URL is the admin's)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(("redis", netloc, parts.path, "", ""))


def argv(name: str) -> list[str]:
    """The command line that runs component `name` in a process of its own (`eddy run NAME`)."""
    return [sys.executable, "-m", "deploy.cli", "run", name]
