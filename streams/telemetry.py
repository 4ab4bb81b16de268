"""A stage's Prometheus metrics: the families of streams/catalogue.py on a registry of the process's
own, served on /metrics beside /ready, and a file_sd target file by which the local Prometheus finds
the stage (whatever port it got) and drops it when it goes.

Hot paths count per batch, never per record: a batch's latencies go into a histogram with numpy in
one call (BatchHistogram), records in per (topic, partition) through one Counter of the batch."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.process_collector import ProcessCollector

from streams import catalogue

log = logging.getLogger(__name__)


class BatchHistogram:
    """A histogram a whole batch of observations enters at once (numpy), for per-record values such
    as latencies that prometheus_client's Histogram would take one locked call each for."""

    def __init__(self, name: str, help: str, labels: dict[str, str], buckets: Sequence[float]) -> None:
        self.name, self.help, self.labels = name, help, labels
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last one: above every bound
        self.total = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray) -> None:
        if not len(values):
            return
        where = np.searchsorted(self.bounds, values, side="left")  # a value equal to a bound is in it (le)
        counts = np.bincount(where, minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.total += float(values.sum())

    def collect(self) -> Iterable[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self.counts).tolist()
            total = self.total
        family = HistogramMetricFamily(self.name, self.help, labels=list(self.labels))
        buckets = [(repr(float(b)), c) for b, c in zip(self.bounds.tolist(), cumulative, strict=False)]
        family.add_metric(list(self.labels.values()), [*buckets, ("+Inf", cumulative[-1])], total)
        yield family


def _family(metric: catalogue.Metric, registry: CollectorRegistry) -> Any:
    kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[metric.kind]
    extra = {"buckets": metric.buckets} if metric.kind == "histogram" and metric.buckets else {}
    return kind(metric.family, metric.help, list(metric.labels), registry=registry, **extra)


class StageMetrics:
    """The catalogue's metrics of one stage of one pipeline, labelled with both. Counters that need
    no other label start at 0, so increase() sees their first events."""

    def __init__(self, pipeline: str, stage: str, registry: CollectorRegistry | None = None) -> None:
        self.pipeline, self.stage = pipeline, stage
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_* series: memory and CPU per process
        common = {"pipeline": pipeline, "stage": stage}
        families = {}
        for metric in catalogue.METRICS:
            if metric.name == "eddy_latency_seconds":
                self.latency = BatchHistogram(metric.name, metric.help, common, metric.buckets)
                self.registry.register(self.latency)
            elif metric.name == "eddy_model_info":
                self._info = _ServingInfo(metric, common)
                self.registry.register(self._info)
            else:
                families[metric.name] = _family(metric, self.registry)
        self._families = families

        def own(name: str):
            family = families[name]
            return family.labels(**common) if catalogue.BY_NAME[name].labels == catalogue.COMMON else family

        self.records_in = families["eddy_records_in_total"]
        self.records_out = families["eddy_records_out_total"]
        self.refused = families["eddy_records_refused_total"]
        self.duplicates, self.late = own("eddy_duplicates_total"), own("eddy_late_events_total")
        self.batch_records, self.batch_seconds = own("eddy_batch_records"), own("eddy_batch_seconds")
        self.commit_seconds = own("eddy_commit_seconds")
        self.lag = families["eddy_consumer_lag_records"]
        self.entities, self.state_writes = own("eddy_entities"), own("eddy_state_writes_total")
        self.model_swaps = own("eddy_model_swaps_total")
        self.updates_refused = families["eddy_model_updates_refused_total"]
        self.scored_rows = own("eddy_scored_rows_total")
        self.model_call_seconds = families["eddy_model_call_seconds"]
        self.redis_errors, self.kafka_errors = own("eddy_redis_errors_total"), own("eddy_kafka_errors_total")
        for reason in catalogue.REFUSAL_REASONS:
            self.refused.labels(pipeline, stage, reason)
        self._common = common
        self._serving: tuple[str, str] | None = None
        self._totals: dict[int, float] = {}

    def family(self, name: str) -> Any:
        """The prometheus_client family of a catalogue metric labelled (pipeline, stage, ...)."""
        return self._families[name]

    # -- from a stage's own running totals (its heartbeat's numbers), about once a second ----------------
    def total(self, counter: Any, value: float) -> None:
        """Bring a counter child up to a running total the stage keeps itself."""
        key = id(counter)
        delta = value - self._totals.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._totals[key] = value

    def refusals(self, by_reason: dict[str, int]) -> None:
        """Dead letters so far by reason class (totals)."""
        for reason, n in by_reason.items():
            self.total(self.refused.labels(self.pipeline, self.stage, reason), n)

    # -- per batch --------------------------------------------------------------------------------------
    def consumed(self, messages: Sequence) -> None:
        """Count a batch's records in, per topic and partition."""
        for (topic, partition), n in Tally((m.topic(), m.partition()) for m in messages).items():
            self.records_in.labels(self.pipeline, self.stage, topic, str(partition)).inc(n)

    def produced(self, topic: str, n: int) -> None:
        if n:
            self.records_out.labels(self.pipeline, self.stage, topic).inc(n)

    def refuse(self, reason: str, n: int = 1) -> None:
        """Count dead letters under one of catalogue.REFUSAL_REASONS."""
        self.refused.labels(self.pipeline, self.stage, reason).inc(n)

    def batch(self, records: int, seconds: float, commit_seconds: float | None = None) -> None:
        self.batch_records.observe(records)
        self.batch_seconds.observe(seconds)
        if commit_seconds is not None:
            self.commit_seconds.observe(commit_seconds)

    def latencies(self, now_ms: float, timestamps_ms: Sequence[int]) -> None:
        """Seconds from each input's Kafka timestamp (ms; <= 0 for none) to now, for a whole batch."""
        stamps = np.fromiter(timestamps_ms, dtype=np.float64, count=len(timestamps_ms))
        stamps = stamps[stamps > 0]
        self.latency.observe_many((now_ms - stamps) / 1000.0)

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        for (topic, partition), n in lags.items():
            self.lag.labels(self.pipeline, self.stage, topic, str(partition)).set(n)

    def model_call(self, rows: int, seconds: float) -> None:
        batch = "1" if rows == 1 else "2-63" if rows < 64 else "64-1023" if rows < 1024 else "1024+"
        self.model_call_seconds.labels(self.pipeline, self.stage, batch).observe(seconds)
        self.scored_rows.inc(rows)

    def serving(self, version: str, device: str) -> None:
        """The version this process serves now: its info series is the only one, at 1."""
        if self._serving is not None and self._serving != (version, device):
            self.model_swaps.inc()
        self._info.serving = self._serving = (version, device)

    def drift(self, measured: dict[str, Any]) -> None:
        """A drift window's figures (models.drift.measures()): PSI and null share per feature, score PSI."""
        psi, nulls = self._families["eddy_feature_psi"], self._families["eddy_feature_null_share"]
        for name, figures in measured["features"].items():
            if figures["psi"] is not None:
                psi.labels(self.pipeline, name).set(figures["psi"])
            if figures["null_share"] is not None:
                nulls.labels(self.pipeline, name).set(figures["null_share"])
        if measured["score_psi"] is not None:
            self._families["eddy_score_psi"].labels(self.pipeline).set(measured["score_psi"])

    def quality(self, version: str, figures: dict[str, Any]) -> None:
        """A version's live quality (models.live.live_metrics()) and holdout PR-AUC, where known."""
        for metric, key in (("eddy_live_pr_auc", "pr_auc"), ("eddy_live_precision", "precision_at_0.5"),
                            ("eddy_live_calibration_error", "calibration_error"), ("eddy_live_labelled", "labelled"),
                            ("eddy_live_positives", "positives"), ("eddy_holdout_pr_auc", "holdout_pr_auc")):
            if figures.get(key) is not None:
                self._families[metric].labels(self.pipeline, version).set(float(figures[key]))

    def refuse_update(self, reason: str) -> None:
        self.updates_refused.labels(self.pipeline, self.stage, reason).inc()


class _ServingInfo:
    """eddy_model_info: one series, the version served now (a Gauge would keep the old versions'
    series, and removing them is refused once Feast has put prometheus_client in multi-process mode)."""

    def __init__(self, metric: catalogue.Metric, common: dict[str, str]) -> None:
        self.metric, self.common = metric, common
        self.serving: tuple[str, str] | None = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.metric.name, self.metric.help, labels=list(self.metric.labels))
        if self.serving is not None:
            family.add_metric([*self.common.values(), *self.serving], 1)
        yield family


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class MetricsServer:
    """/metrics and /ready of one process on host:port (port 0: any free one), in a daemon thread;
    with `targets_dir`, a Prometheus file_sd target file names it until close()."""

    def __init__(self, metrics: StageMetrics, part: str, ready: Callable[[], bool] = lambda: True,
                 host: str = "127.0.0.1", port: int = 0, targets_dir: Path | None = None) -> None:
        metrics_app = make_wsgi_app(metrics.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/ready":
                ok = ready()
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"ready\n" if ok else b"not ready\n"]
            return metrics_app(environ, start_response)

        self.httpd = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
        self.host, self.port = host, self.httpd.server_port
        self.url = f"http://{self.host}:{self.port}/metrics"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.target_file = None
        if targets_dir is not None:
            targets_dir.mkdir(parents=True, exist_ok=True)
            self.target_file = targets_dir / f"{part}.json"
            entry = [{"targets": [f"{self.host}:{self.port}"],
                      "labels": {"job": f"eddy-{metrics.stage}", "pipeline": metrics.pipeline, "part": part}}]
            tmp = self.target_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, self.target_file)
        log.info("metrics on %s", self.url)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)


def refusal_reason(reason: str) -> str:
    """The catalogue's class (REFUSAL_REASONS) of a dead letter's eddy.error text."""
    if reason.startswith(("not JSON", "empty record", "expected a JSON object")):
        return "not_json"
    if "ahead of the record's Kafka timestamp" in reason:
        return "future_time"
    if reason.startswith("record of ") and "bytes" in reason:
        return "too_large"
    if reason.startswith("unreadable features record"):
        return "unreadable_features"
    if reason.startswith("features the model cannot take"):
        return "model_input"
    if "cannot be counted" in reason or "is not a finite" in reason and "expected" not in reason:
        return "aggregation"
    return "schema"
