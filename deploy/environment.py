"""What a process eddy starts is given: the caller's environment with the settings made explicit, and the
object store's variables that delta-rs and Spark read. Besides Settings, the one place that reads
os.environ."""

from __future__ import annotations

import os
from collections.abc import Mapping

from deploy.settings import Settings


def store_environment(settings: Settings) -> dict[str, str]:
    """The AWS_* variables that delta-rs and Spark's S3A read for the object store (none without one)."""
    store = settings.object_store
    return store.environment() if store is not None else {}


def export_store_environment(settings: Settings) -> None:
    """Put store_environment into this process's environment: delta-rs opens tables by URI alone, and
    Spark's driver and the JVM it starts inherit it (called once, where a process loads its settings)."""
    os.environ.update(store_environment(settings))


def inherited_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with `extra` over it: what a tool eddy runs (podman, a peer engine) is
    given; the one place besides Settings that reads the environment."""
    return {**os.environ, **(extra or {})}


def child_environment(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process eddy starts: the caller's, with the settings made explicit."""
    env = inherited_environment()
    env.update(
        EDDY_HOME=str(settings.home),
        EDDY_KAFKA_BOOTSTRAP=settings.kafka.bootstrap,
        EDDY_KAFKA_LISTEN=settings.kafka_listen,
        EDDY_REDIS_URL=settings.redis_url,
        EDDY_REDIS_LISTEN=settings.redis_listen,
        EDDY_LAKEHOUSE=settings.lakehouse,
        EDDY_PIPELINE=str(settings.pipeline),
        EDDY_DEVICE=settings.device,
        EDDY_ENGINE=settings.engine,
        EDDY_STAGES="fused" if settings.fused else "split",  # as resolved: what the stack runs
        EDDY_GUARANTEE=settings.guarantee,
        EDDY_PARTITIONS=str(settings.partitions),
        EDDY_SCORERS=str(settings.scorers),
        EDDY_ENGINE_WORKERS=str(settings.engine_workers),
        EDDY_INGEST="on" if settings.ingest else "off",
        EDDY_INSECURE="on" if settings.insecure else "off",
        EDDY_REDIS_TLS="on" if settings.redis_tls else "off",
        EDDY_REDIS_MAXMEMORY=settings.redis_maxmemory,
        EDDY_MONITORING="on" if settings.monitoring else "off",
        EDDY_METRICS_PORT=str(settings.metrics_port),
        EDDY_SPARK_MASTER=settings.spark_master,
        EDDY_S3_ENDPOINT=settings.s3_endpoint,
        EDDY_S3_REGION=settings.s3_region,
        EDDY_JARS=str(settings.jars_dir),  # a job submitted to a cluster runs from a copy of the code
        EDDY_FLINK_CLUSTER=settings.flink_cluster,
        EDDY_FLINK_TASKMANAGERS=str(settings.flink_taskmanagers),
        EDDY_FLINK_PARALLELISM=str(settings.flink_parallelism or ""),
        EDDY_FLINK_CHECKPOINTS=settings.flink_checkpoints,
        PYTHONUNBUFFERED="1",
    )
    env.update(store_environment(settings))
    if settings.spark_master.startswith("local"):  # a driver a cluster must reach binds no loopback
        env["SPARK_LOCAL_IP"] = "127.0.0.1"
    if settings.engine == "flink":  # the JVM PyFlink starts logs beside the engine's data, not into pyflink
        env.setdefault("FLINK_LOG_DIR", str(settings.engine_dir / "log"))
    env.update(extra or {})
    return env
