"""Settings -> the lakehouse: the Spark session of a process, the ingestion component, the SQL and
maintenance commands."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.settings import Settings
from deploy.spark_cluster import cluster_conf
from features.spec import PipelineSpec
from lakehouse.ingest import IngestConfig, IngestStats
from lakehouse.session import SparkConfig, kafka_options, start_session
from streams.kafka import java_client_properties

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from streams.telemetry import StageMetrics

INGEST_COMPONENT = "lakehouse"


LOG4J = """status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = {path}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{{ISO8601}} %p %c{{1}}: %m%n
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
"""


def spark_session(settings: Settings, app: str) -> SparkSession:
    """A Spark session for this EDDY_HOME: EDDY_SPARK_MASTER, EDDY_SPARK_CONF settings win over ours.
    The driver JVM logs to its own file, EDDY_HOME/logs/<app>.jvm.log, never to the terminal."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    log4j = settings.run_dir / f"log4j2-{app}.properties"
    log4j.write_text(LOG4J.format(path=settings.logs_dir / f"{app}.jvm.log"))
    conf = {"spark.sql.warehouse.dir": str(settings.home / "spark-warehouse"),
            "spark.ui.showConsoleProgress": "false",
            "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{log4j}",
            **(settings.object_store.hadoop_conf() if settings.object_store else {}),
            **cluster_conf(settings),
            **settings.spark_conf}
    config = SparkConfig(settings.jars_dir, master=settings.spark_master, app_name=app, conf=conf)
    with _jvm_output_to(settings.logs_dir / f"{app}.jvm.log"):
        session = start_session(config)
    # PySpark's own logger prints each failed query's JVM trace on stderr; ours go to the log file.
    from pyspark.logger import PySparkLogger

    PySparkLogger.getLogger("SQLQueryContextLogger").handlers[:] = logging.getLogger().handlers
    return session


@contextmanager
def _jvm_output_to(path: Path) -> Iterator[None]:
    """The driver JVM inherits this process's stdout and stderr when it starts: point them at the
    JVM's log file for the launch, so its launcher notes stay off the terminal for its whole life."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def ingest_config(settings: Settings) -> IngestConfig:
    return IngestConfig(root=settings.lakehouse,
                        kafka_options=kafka_options(settings.kafka.bootstrap, java_client_properties(settings.kafka)),
                        trigger_s=settings.ingest_trigger_s)


def lakehouse_rows(settings: Settings, spec: PipelineSpec):
    """The training-set reader `eddy retrain` uses: labelled feature rows from the lakehouse, with
    Feast's point-in-time retrieval over silver/features_backfill for features the stream's rows lack."""
    def rows():
        from lakehouse.training import labelled_features, unjoined_labels
        from models.retrain import records_from_frame

        session = spark_session(settings, "eddy-retrain")
        frame = labelled_features(session, settings.lakehouse, spec,
                                  point_in_time=backfill_point_in_time(settings, spec, session))
        return records_from_frame(spec, frame, unjoined_labels(session, settings.lakehouse, spec))

    return rows


def backfill_point_in_time(settings: Settings, spec: PipelineSpec, session: SparkSession):
    """frame (key, event_time) -> the same rows with each feature as of that time, from Feast's
    Spark offline store over silver/features_backfill; None when `eddy backfill` has not run."""
    from delta.tables import DeltaTable

    from lakehouse.ingest import table_location
    from lakehouse.offline import historical_features, offline_feature_store
    from lakehouse.tables import backfill_table

    table = backfill_table(spec)
    if not DeltaTable.isDeltaTable(session, table_location(settings.lakehouse, table)):
        return None

    def point_in_time(frame):
        store = offline_feature_store(session, spec, settings.lakehouse, settings.home / "feast-backfill",
                                      settings.redis_url, table=table)
        return historical_features(session, store, spec, frame)

    return point_in_time


def run_backfill(settings: Settings, spec: PipelineSpec) -> int:
    """`eddy backfill`: silver/features_backfill recomputed from bronze; returns its rows."""
    from lakehouse.backfill import write_backfill

    return write_backfill(spark_session(settings, "eddy-backfill"), settings.lakehouse, spec)


def run_ingest_component(settings: Settings, spec: PipelineSpec, metrics: StageMetrics | None = None) -> None:
    """`eddy run lakehouse`: ingestion until SIGTERM, with a heartbeat per second for `eddy status`
    (and its counts in `metrics`)."""
    import redis

    from lakehouse.ingest import run_ingestion
    from streams.metrics import Heartbeat

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    session = spark_session(settings, "eddy-ingest")
    heartbeat = Heartbeat(redis.Redis.from_url(settings.redis_url), spec.name, INGEST_COMPONENT)

    def report(stats: IngestStats) -> None:
        heartbeat.beat(stats.events, lag=stats.lag, batches=stats.batches, last_batch_ms=stats.last_batch_ms,
                       rows=sum(stats.rows.values()))
        if metrics is not None:
            for table, rows in stats.rows.items():
                metrics.total(metrics.records_out.labels(spec.name, INGEST_COMPONENT, table), rows)

    threading.Thread(target=monitor_lakehouse, args=(settings, spec, metrics, stop), name="monitor",
                     daemon=True).start()
    run_ingestion(session, spec, ingest_config(settings), report, stop.is_set)


def monitor_lakehouse(settings: Settings, spec: PipelineSpec, metrics: StageMetrics | None,
                      stop: threading.Event) -> None:
    """Every EDDY_MONITOR_EVERY until `stop`: the scorers' merged drift window into gold.drift, and
    (with `metrics`) each version's live quality and holdout PR-AUC and each table's freshness."""
    from streams.stores import redis_client

    log = logging.getLogger("eddy.monitor")
    client = redis_client(settings.redis_url)
    sampled: dict[str, Any] = {"at": None}
    while not stop.wait(settings.monitor_every_s):
        tasks: list[Callable[[], object]] = [lambda: sample_drift(settings, spec, client, sampled)]
        if metrics is not None:
            tasks.append(lambda: export_quality(settings, spec, metrics))
        for task in tasks:
            try:
                task()
            except Exception as exc:  # noqa: BLE001 - a failed sample (Redis away, a table mid-write) waits for the next
                log.warning("monitoring sample failed: %s", str(exc).splitlines()[0] if str(exc) else exc)


def sample_drift(settings: Settings, spec: PipelineSpec, client, sampled: dict[str, Any]) -> int:
    """Append the scorers' merged drift window to gold.drift when it is newer than the last sampled;
    returns the rows appended."""
    from datetime import UTC, datetime

    from lakehouse.registry import append_drift
    from models.drift import measures, merged_snapshot

    merged = merged_snapshot(client, spec.name)
    if merged is None or merged["at"] == sampled.get("at") or not merged["rows"]:
        return 0
    sampled["at"] = merged["at"]
    figures = measures(merged)
    at = datetime.fromtimestamp(merged["at"], UTC)
    common = {"measured_at": at, "version": figures["version"], "rows": figures["rows"],
              "replicas": merged["replicas"]}
    rows = [{**common, "kind": "feature", "feature": name, "psi": f["psi"], "null_share": f["null_share"],
             "ref_null_share": f["ref_null_share"]} for name, f in figures["features"].items()]
    rows.append({**common, "kind": "score", "feature": None, "psi": figures["score_psi"], "null_share": None,
                 "ref_null_share": None})
    append_drift(settings.lakehouse, rows)
    return len(rows)


def export_quality(settings: Settings, spec: PipelineSpec, metrics: StageMetrics) -> None:
    """Each version's live quality (gold.predictions joined with the labels) with its holdout PR-AUC
    from gold.models, and each ingested table's freshness, into `metrics`."""
    import time

    from lakehouse.ingest import newest_kafka_timestamp
    from lakehouse.registry import registered_models
    from lakehouse.tables import ingested_tables
    from models.live import live_metrics

    holdout = {row["version"]: ((row.get("metrics") or {}).get("holdout") or {}).get("pr_auc")
               for row in registered_models(settings.lakehouse)}
    for version, figures in live_metrics(settings.lakehouse, spec).items():
        metrics.quality(version, {**figures, "holdout_pr_auc": holdout.get(version)})
    for version, pr_auc in holdout.items():
        metrics.quality(version, {"holdout_pr_auc": pr_auc})
    freshness = metrics.family("eddy_lakehouse_freshness_seconds")
    for table in ingested_tables(spec):
        newest = newest_kafka_timestamp(settings.lakehouse, table)
        if newest is not None:
            freshness.labels(spec.name, f"{table.layer}.{table.name}").set(max(0.0, time.time() - newest))


RETRAIN_COMPONENT = "retrainer"


def run_retrain_component(settings: Settings, spec: PipelineSpec) -> None:
    """`eddy run retrainer`: retrain from the lakehouse when the policy says so, publish only an
    improvement; its Spark session stays up between retrains."""
    import logging
    import time

    from lakehouse.ingest import row_count
    from lakehouse.registry import register_model
    from lakehouse.tables import ingested_tables
    from models.continuous import RetrainPolicy
    from models.drift import largest_drift
    from models.retrain import retrain
    from models.rollout import load_policy
    from streams.metrics import Heartbeat
    from streams.stores import redis_client

    log = logging.getLogger("eddy.retrainer")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    policy = RetrainPolicy(settings.retrain_every_labels, settings.retrain_every_s, settings.retrain_on_drift)
    labels_table = next(t for t in ingested_tables(spec) if spec.labels and t.topic == spec.labels.topic)
    client = redis_client(settings.redis_url)
    heartbeat = Heartbeat(client, spec.name, RETRAIN_COMPONENT)
    rows = lakehouse_rows(settings, spec)
    state: dict[str, Any] = {"retrains": 0, "published": 0, "last_version": None, "last_error": None}
    while not stop.is_set():
        labels = row_count(settings.lakehouse, labels_table)
        heartbeat.beat(state["retrains"], force=True, labels=labels, **state)
        drift = largest_drift(client, spec.name) if settings.retrain_on_drift else None
        if policy.due(labels, time.monotonic(), drift):
            if drift is not None and drift > (settings.retrain_on_drift or 0):
                log.info("retraining: a feature drifted (PSI %.3f above %s)", drift, settings.retrain_on_drift)
            policy.done(labels, time.monotonic())
            try:
                result = retrain(settings.kafka, spec, settings.artifacts, settings.signing_key(),
                                 settings.device, "auto", rows=rows,
                                 register=lambda entry: register_model(settings.lakehouse, entry),
                                 rollout_policy=load_policy(settings.rollout_policy) if settings.rollout_policy else None)
                if result.rollout is not None:
                    from deploy.rollouts import record

                    record(settings, result.rollout, "start", f"by the retrainer: steps {list(result.rollout.steps)}",
                           {"policy": result.rollout.policy})
                state.update(retrains=state["retrains"] + 1, published=state["published"] + result.published,
                             last_version=result.version, last_error=None)
                log.info("retrained %s on %d rows: PR-AUC %s against %s %s; %s", result.version, result.rows,
                         result.metrics.get("pr_auc"), result.champion,
                         (result.champion_metrics or {}).get("pr_auc"),
                         "published" if result.published else f"kept ({result.refused})" if result.refused else "kept")
            except Exception as exc:  # noqa: BLE001 - one failed retrain (too few labels) waits for the next
                state["last_error"] = str(exc)[:200]
                log.warning("retrain failed: %s", exc)
        stop.wait(5.0)
