"""The metric catalogue: every Prometheus metric eddy's processes serve, with its type, help, labels and
buckets, so the code that instruments a stage, the rules and the dashboards share one list.

Pure data: it imports nothing of eddy's (nor prometheus_client), so any package can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

# The `stage` label's values; each is also the stage id's suffix (eddy-<pipeline>-<stage>).
STAGES = ("features", "online-writer", "scorer", "lakehouse", "retrainer", "rollouts")
# The `reason` label of eddy_records_refused_total: short classes, never free text (cardinality).
REFUSAL_REASONS = ("not_json", "schema", "future_time", "too_large", "aggregation", "unreadable_features",
                   "model_input")
# The `batch` label of eddy_model_call_seconds: batch sizes in four classes.
MODEL_CALL_BATCHES = ("1", "2-63", "64-1023", "1024+")
# Prometheus's scrape job of the supervisor process; each stage's job is "eddy-<stage>".
SUPERVISOR_JOB = "eddy-supervisor"
JOB_PATTERN = "eddy-.+"
# The serving threshold eddy_live_precision is measured at.
SERVING_THRESHOLD = 0.5

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Suggested buckets where the catalogue fixes none; any buckets work with the rules and dashboards.
BATCH_RECORDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MODEL_CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

COMMON = ("pipeline", "stage")


@dataclass(frozen=True)
class Metric:
    """One metric family. `name` is the name PromQL selects (a counter's ends in `_total`)."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def family(self) -> str:
        """The name prometheus_client's constructor takes: a counter's without `_total`."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name

    @property
    def series(self) -> tuple[str, ...]:
        """The series names this family exposes, as queries select them."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


METRICS: tuple[Metric, ...] = (
    Metric("eddy_records_in_total", "counter", "Records consumed.", (*COMMON, "topic", "partition")),
    Metric("eddy_records_out_total", "counter", "Records produced (features, predictions, ...).", (*COMMON, "topic")),
    Metric("eddy_records_refused_total", "counter", "Records dead-lettered, by reason class.", (*COMMON, "reason")),
    Metric("eddy_duplicates_total", "counter", "Records dropped as duplicates of an id already seen.", COMMON),
    Metric("eddy_late_events_total", "counter", "Events later than the allowed lateness.", COMMON),
    Metric("eddy_batch_records", "histogram", "Records per processed batch.", COMMON, BATCH_RECORDS_BUCKETS),
    Metric("eddy_batch_seconds", "histogram", "Processing time of one batch.", COMMON, DURATION_BUCKETS),
    Metric("eddy_commit_seconds", "histogram", "Time to commit one Kafka transaction.", COMMON, DURATION_BUCKETS),
    Metric("eddy_latency_seconds", "histogram",
           "From the source record's Kafka timestamp to the output's: the engines pass the event's on to its "
           "features record, so at the online writer and the scorer it is end to end (event -> prediction).",
           COMMON, LATENCY_BUCKETS),
    Metric("eddy_consumer_lag_records", "gauge", "Records between the group's position and the partition's end.",
           (*COMMON, "topic", "partition")),
    Metric("eddy_entities", "gauge", "Entities held in state.", COMMON),
    Metric("eddy_state_writes_total", "counter", "Writes to the state store.", COMMON),
    Metric("eddy_model_info", "gauge", "1 for the model version this process serves.", (*COMMON, "version", "device")),
    Metric("eddy_model_swaps_total", "counter", "Model versions swapped in while serving.", COMMON),
    Metric("eddy_model_updates_refused_total", "counter", "Model updates refused, by reason.", (*COMMON, "reason")),
    Metric("eddy_scored_rows_total", "counter", "Rows scored by the model.", COMMON),
    Metric("eddy_model_call_seconds", "histogram", "Time of one model call, by batch size class.",
           (*COMMON, "batch"), MODEL_CALL_BUCKETS),
    Metric("eddy_redis_errors_total", "counter", "Redis errors (each failed call).", COMMON),
    Metric("eddy_kafka_errors_total", "counter", "Kafka client errors (each error callback or failed call).", COMMON),
    Metric("eddy_stage_restarts_total", "counter", "Restarts of a stage by the supervisor.", COMMON),
    Metric("eddy_stage_crash_looping", "gauge", "1 while the supervisor holds a stage as crash-looping.", COMMON),
    Metric("eddy_feature_psi", "gauge",
           "Population stability index of a feature's live window against the manifest's reference bins.",
           ("pipeline", "feature")),
    Metric("eddy_feature_null_share", "gauge", "Share of nulls of a feature in the live window.",
           ("pipeline", "feature")),
    Metric("eddy_score_psi", "gauge", "Population stability index of the live scores against the reference.",
           ("pipeline",)),
    Metric("eddy_live_pr_auc", "gauge", "PR-AUC of a version on its labelled predictions.", ("pipeline", "version")),
    Metric("eddy_live_precision", "gauge", "Precision at the serving threshold on labelled predictions.",
           ("pipeline", "version")),
    Metric("eddy_live_calibration_error", "gauge", "Expected calibration error on labelled predictions.",
           ("pipeline", "version")),
    Metric("eddy_holdout_pr_auc", "gauge", "PR-AUC of a version on its training holdout.", ("pipeline", "version")),
    # Not in the first catalogue: the evidence behind the live gauges above (models.live.live_metrics()
    # already counts both), which EddyLiveQualityBelowHoldout needs before it judges a version.
    Metric("eddy_live_labelled", "gauge", "Labelled predictions the live quality gauges are computed on.",
           ("pipeline", "version")),
    Metric("eddy_live_positives", "gauge", "Positive labels among them.", ("pipeline", "version")),
    Metric("eddy_lakehouse_freshness_seconds", "gauge", "Age of the newest committed row's Kafka timestamp.",
           ("pipeline", "table")),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

# Series Prometheus writes itself (per scrape target, and its alerts' state), and those
# prometheus_client's default registry serves (the process collector) beside eddy's own.
PROMETHEUS_SERIES = ("up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS")
PROCESS_SERIES = ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                  "process_start_time_seconds")


def series_names() -> frozenset[str]:
    """Every series name a rule or a dashboard may select (recording rules aside)."""
    return frozenset(s for m in METRICS for s in m.series) | frozenset(PROMETHEUS_SERIES) | frozenset(PROCESS_SERIES)
