"""`make demo`: the loop on the local stack, unattended: a day of history, a first training, a live stream
with a live view, a retrain that swaps in while events flow, analytics, and a summary."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, deque

import numpy as np
import orjson
from confluent_kafka import Consumer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deploy import stack
from deploy.settings import Settings
from features.spec import load_spec
from models.retrain import retrain
from streams.generator import GeneratorConfig, TransactionGenerator
from streams.kafka import group_lag
from streams.producer import SyntheticProducer

HISTORY_EVENTS = 40_000
LIVE_RATE = 300
LIVE_SECONDS = 40
FLAG_AT = 0.5


class PredictionWatcher:
    """Reads predictions as they commit, for the live view and the analytics."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer(settings.kafka.client(**{
            "group.id": f"eddy-demo-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "isolation.level": "read_committed"}))
        self.consumer.subscribe([topic])
        self.rows: list[dict] = []
        self.latency_ms: deque[float] = deque(maxlen=2000)
        self.rate = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last_t, last_n = time.monotonic(), 0
        while not self._stop.is_set():
            for m in self.consumer.consume(2000, 0.2):
                if m.error() is None:
                    row = orjson.loads(m.value())
                    self.rows.append(row)
                    if row["event_id"].startswith("live"):
                        event_ms = np.datetime64(row["event_time"].rstrip("Z"), "ms").astype(np.int64)
                        self.latency_ms.append(m.timestamp()[1] - int(event_ms))
            now = time.monotonic()
            if now - last_t >= 1.0:
                self.rate, last_t, last_n = (len(self.rows) - last_n) / (now - last_t), now, len(self.rows)
        self.consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def _wait_for(watcher: PredictionWatcher, count: int, console: Console, timeout_s: float = 600) -> None:
    with console.status("") as status:
        deadline = time.monotonic() + timeout_s
        while len(watcher.rows) < count and time.monotonic() < deadline:
            status.update(f"features and scoring the history: {len(watcher.rows):,}/{count:,} predictions")
            time.sleep(0.5)


def _view(settings, spec, watcher: PredictionWatcher, produced: int, lags: dict, note: str) -> Table:
    live = [r for r in watcher.rows if r["event_id"].startswith("live")]
    lat = np.array(watcher.latency_ms)
    table = Table(title="eddy demo: live stream", show_header=False)
    table.add_row("events produced (live)", f"{produced:,} at {LIVE_RATE}/s")
    table.add_row("predictions/s", f"{watcher.rate:,.0f}")
    table.add_row("latency p50 / p99 (event -> prediction)",
                  f"{np.percentile(lat, 50):,.0f} / {np.percentile(lat, 99):,.0f} ms" if lat.size else "-")
    table.add_row("lag features / scorer", f"{lags.get('features', '-')} / {lags.get('scorer', '-')}")
    table.add_row("serving version", live[-1]["model_version"] if live else "-")
    table.add_row("frauds flagged (score > 0.5)", f"{sum(r['score'] > FLAG_AT for r in live):,} of {len(live):,}")
    table.add_row("", note)
    return table


def run_demo(settings: Settings, console: Console) -> dict:
    spec = load_spec(settings.pipeline)
    summary: dict = {}
    started = time.time()
    console.rule("1. eddy up")
    report = stack.up(settings, spec)
    for name, part in report.parts.items():
        console.print(f"  {name:<16} pid {part['pid']}  log {part['log']}")
    watcher = PredictionWatcher(settings, spec.topics.predictions)
    watcher.thread.start()
    try:
        console.rule("2. a day of history with labels")
        before = len(watcher.rows)
        now_ms = int(time.time() * 1000)
        history = TransactionGenerator(GeneratorConfig(seed=7, cards=3000, start_ms=now_ms - 86_400_000,
                                                       mean_gap_ms=86_400_000 / HISTORY_EVENTS,
                                                       id_prefix=f"hist{now_ms}"))
        produced = SyntheticProducer(settings.kafka, spec.topics.source, spec.labels.topic, history).run(
            HISTORY_EVENTS, None, backfill=True)
        console.print(f"  produced {produced.events:,} events ({produced.frauds} fraud) and {produced.labels:,} "
                      f"labels in {produced.seconds:.1f}s")
        _wait_for(watcher, before + HISTORY_EVENTS, console)
        console.print(f"  {len(watcher.rows) - before:,} predictions by {watcher.rows[-1]['model_version']}")

        console.rule("3. first training (champion: the baseline)")
        first = retrain(settings.kafka, spec, settings.artifacts_dir, settings.model_key.reveal(), settings.device,
                        "auto", on_progress=lambda line: None)
        console.print(f"  {first.version}: holdout PR-AUC {first.metrics['pr_auc']:.3f} against "
                      f"{first.champion} {first.champion_metrics['pr_auc'] if first.champion_metrics else None}; "
                      f"{'published' if first.published else 'not published'} ({first.seconds:.1f}s)")
        summary["first"] = first

        console.rule(f"4. live stream at {LIVE_RATE} events/s, a retrain midway")
        live = TransactionGenerator(GeneratorConfig(seed=8, cards=20_000, start_ms=int(time.time() * 1000),
                                                    id_prefix=f"live{now_ms}", fraud_rate=0.02))
        producer = SyntheticProducer(settings.kafka, spec.topics.source, spec.labels.topic, live, label_delay_ms=2000)
        thread = threading.Thread(target=producer.run, args=(LIVE_RATE * LIVE_SECONDS, float(LIVE_RATE), False))
        thread.start()
        second_box: list = []
        retrainer = None
        lags: dict = {}
        note = ""
        with Live(console=console, refresh_per_second=2) as view:
            t0 = time.monotonic()
            while thread.is_alive():
                if retrainer is None and time.monotonic() - t0 > LIVE_SECONDS / 3:
                    note = "retraining on everything labelled so far..."
                    retrainer = threading.Thread(target=lambda: second_box.append(retrain(
                        settings.kafka, spec, settings.artifacts_dir, settings.model_key.reveal(), settings.device,
                        "auto", seed=1)))
                    retrainer.start()
                if second_box and "retraining" in note:
                    second = second_box[0]
                    note = (f"published {second.version}: watch the serving version change" if second.published
                            else f"{second.version} was not better than {second.champion}: not published")
                lag = group_lag(settings.kafka, timeout_s=2)
                lags = {"features": lag.get(f"eddy-{spec.name}-features", {}).get(spec.topics.source),
                        "scorer": lag.get(f"eddy-{spec.name}-scorer", {}).get(spec.topics.features)}
                view.update(_view(settings, spec, watcher, producer.report.events, lags, note))
                time.sleep(1.0)
            if retrainer is not None:
                retrainer.join()
            time.sleep(3)
            view.update(_view(settings, spec, watcher, producer.report.events, lags, note))
        summary["second"] = second_box[0] if second_box else None

        console.rule("5. analytics over the predictions and labels")
        summary["analytics"] = _analytics(settings, spec, watcher.rows, console)
    finally:
        watcher.stop()
        console.rule("6. eddy down")
        console.print("  stopped: " + ", ".join(stack.down(settings)))
    summary["seconds"] = round(time.time() - started, 1)
    summary["predictions"] = len(watcher.rows)
    _print_summary(summary, console)
    return summary


def _analytics(settings, spec, predictions: list[dict], console: Console) -> dict:
    """Fraud rate and the precision of flagged events by channel and model version."""
    from models.retrain import _read_all

    labels = {}
    for raw in _read_all(settings.kafka, spec.labels.topic, idle_s=2.0):
        label = orjson.loads(raw)
        labels[label["event_id"]] = bool(label["is_fraud"])
    channels = {}
    for raw in _read_all(settings.kafka, spec.topics.source, idle_s=2.0):
        event = orjson.loads(raw)
        channels[event["event_id"]] = event["channel"]
    by = Counter()
    for p in predictions:
        if p["event_id"] in labels:
            key = (channels.get(p["event_id"], "?"), p["model_version"])
            by[key + ("n",)] += 1
            by[key + ("fraud",)] += labels[p["event_id"]]
            if p["score"] > FLAG_AT:
                by[key + ("flagged",)] += 1
                by[key + ("hit",)] += labels[p["event_id"]]
    table = Table(title="fraud rate and precision of flagged events, by channel and model version")
    for column in ("channel", "model", "events", "fraud rate", "flagged", "precision"):
        table.add_column(column)
    rows = []
    for channel, version in sorted({k[:2] for k in by}):
        n, fraud = by[(channel, version, "n")], by[(channel, version, "fraud")]
        flagged, hit = by[(channel, version, "flagged")], by[(channel, version, "hit")]
        rows.append({"channel": channel, "model": version, "events": n, "fraud_rate": fraud / n,
                     "flagged": flagged, "precision": hit / flagged if flagged else None})
        table.add_row(channel, version, f"{n:,}", f"{fraud / n:.2%}", f"{flagged:,}",
                      f"{hit / flagged:.2%}" if flagged else "-")
    console.print(table)
    return {"rows": rows}


def _print_summary(summary: dict, console: Console) -> None:
    console.rule("summary")
    first, second = summary.get("first"), summary.get("second")
    console.print(f"  {summary['predictions']:,} predictions in {summary['seconds']:.0f}s")
    if first is not None:
        console.print(f"  first retrain {first.version}: PR-AUC {first.metrics['pr_auc']:.3f}, "
                      f"baseline {first.champion_metrics['pr_auc'] if first.champion_metrics else '-'}")
    if second is not None:
        console.print(f"  second retrain {second.version}: PR-AUC {second.metrics['pr_auc']:.3f}, "
                      f"its champion {second.champion}: "
                      f"{second.champion_metrics['pr_auc'] if second.champion_metrics else '-'}")
