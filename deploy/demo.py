"""`make demo`: the loop on the local stack, unattended: a day of history, a first training, a live stream
with a live view, a retrain that goes out as a canary judged on live labels while events flow (promoted
or rolled back by itself), analytics, and a summary."""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque

import numpy as np
import orjson
from confluent_kafka import Consumer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deploy import stack
from deploy.lake import lakehouse_rows
from deploy.rollouts import record
from deploy.rollouts import status as rollout_status
from deploy.settings import Settings
from features.errors import EddyError
from features.spec import load_spec
from features.waiting import poll
from lakehouse.registry import register_model
from models.live import live_metrics
from models.retrain import retrain
from models.rollout import Policy
from streams.generator import GeneratorConfig, TransactionGenerator
from streams.kafka import group_lag
from streams.producer import SyntheticProducer
from streams.stores import redis_client

HISTORY_EVENTS = 40_000
DAY_MS = 86_400_000
GAP_MS = DAY_MS / HISTORY_EVENTS  # mean event-time gap of the stream, history and live alike
LIVE_RATE = 300
LIVE_SECONDS = 40      # the retrain starts a third of the way in
LIVE_MAX_EVENTS = LIVE_RATE * 240  # the stream runs on until the rollout has ended, at most 4 minutes
LIVE_SPAN_MS = int(LIVE_MAX_EVENTS * GAP_MS)  # the live stream's event time, at the longest
FLAG_AT = 0.5
# The second retrain goes out as a canary: half the cards, then all, each step judged on 500 labelled
# live predictions with 8 frauds; a bound broken (PR-AUC 0.05 below the champion's, ...) rolls it back.
DEMO_POLICY = Policy(steps=(50, 100), min_labelled=500, min_positives=8, min_step_s=5)


class PredictionWatcher:
    """Reads transactions and predictions as they commit, for the live view and the analytics;
    latency is a prediction's Kafka timestamp minus its transaction's."""

    def __init__(self, settings: Settings, source: str, topic: str) -> None:
        self.consumer = Consumer(settings.kafka.client(**{
            "group.id": f"eddy-demo-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "isolation.level": "read_committed", "fetch.wait.max.ms": 100}))
        self.source, self.topic = source, topic
        self.consumer.subscribe([source, topic])
        self.rows: list[dict] = []
        self.live: list[dict] = []
        self.live_ids: set[str] = set()  # the events of the live stream, told by the demo
        self._sent_at: dict[str, int] = {}
        self.latency_ms: deque[float] = deque(maxlen=2000)
        self.rate = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last_t, last_n = time.monotonic(), 0
        while not self._stop.is_set():
            for m in self.consumer.consume(2000, 0) or self.consumer.consume(1, 0.2):
                value = m.value()
                if m.error() is not None or value is None:
                    continue
                if m.topic() == self.source:
                    self._sent_at[orjson.loads(value)["event_id"]] = m.timestamp()[1]
                    continue
                row = orjson.loads(value)
                self.rows.append(row)
                if row["event_id"] in self.live_ids:
                    self.live.append(row)
                    sent = self._sent_at.get(row["event_id"])
                    if sent is not None:
                        self.latency_ms.append(m.timestamp()[1] - sent)
            now = time.monotonic()
            if now - last_t >= 1.0:
                self.rate, last_t, last_n = (len(self.rows) - last_n) / (now - last_t), now, len(self.rows)
        self.consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def _wait_for(watcher: PredictionWatcher, count: int, console: Console, timeout_s: float = 600) -> None:
    with console.status("") as status:

        def arrived() -> bool:
            if len(watcher.rows) >= count:
                return True
            status.update(f"features and scoring the history: {len(watcher.rows):,}/{count:,} predictions")
            return False

        poll(arrived, timeout_s, every_s=0.5)


def _view(settings, spec, watcher: PredictionWatcher, produced: int, lags: dict, note: str,
          rollout: dict | None = None) -> Table:
    live = watcher.live
    lat = np.array(watcher.latency_ms)
    table = Table(title="eddy demo: live stream", show_header=False)
    table.add_row("events produced (live)", f"{produced:,} at {LIVE_RATE}/s")
    table.add_row("predictions/s", f"{watcher.rate:,.0f}")
    table.add_row("latency p50 / p99 (event -> prediction)",
                  f"{np.percentile(lat, 50):,.0f} / {np.percentile(lat, 99):,.0f} ms" if lat.size else "-")
    if settings.fused:  # one stage, one consumer group: features, online store and scoring together
        table.add_row("lag (the fused stage)", f"{lags.get('features', '-')}")
    else:
        table.add_row("lag features / scorer", f"{lags.get('features', '-')} / {lags.get('scorer', '-')}")
    recent = {r["model_version"] for r in live[-500:]}
    table.add_row("serving version(s)", ", ".join(sorted(recent)) if live else "-")
    if rollout and rollout.get("mode", "none") != "none":
        table.add_row("rollout", f"{rollout['challenger']} {rollout['mode']} at {rollout['rollout']['weight']:.0%} "
                                 f"(step {rollout['step'] + 1} of {len(rollout['steps'])}); next: "
                                 f"{rollout['next']['action']}")
        for who in ("champion", "challenger"):
            f = rollout["metrics"].get(who, {})
            pr = f"{f['pr_auc']:.3f}" if f.get("pr_auc") is not None else "-"
            table.add_row(f"  {who} {rollout[who]}", f"{f.get('labelled', 0):,} labelled, {f.get('positives', 0)} fraud, "
                                                     f"live PR-AUC {pr} (this step)")
    table.add_row("frauds flagged (score > 0.5)", f"{sum(r['score'] > FLAG_AT for r in live):,} of {len(live):,}")
    table.add_row("", note)
    return table


def run_demo(settings: Settings, console: Console) -> dict:
    spec = load_spec(settings.pipeline)
    if spec.labels is None:
        raise EddyError(f"the demo trains on labels, and {settings.pipeline} has no labels section")
    summary: dict = {}
    started = time.time()
    console.rule("1. eddy up")
    report = stack.up(settings, spec)
    settings = report.settings or settings  # signed in to the stack it just started
    for name, part in report.parts.items():
        console.print(f"  {name:<16} pid {part['pid']}  log {part['log']}")
    watcher = PredictionWatcher(settings, spec.topics.source, spec.topics.predictions)
    watcher.thread.start()
    try:
        console.rule("2. a day of history with labels")
        before = len(watcher.rows)
        now_ms = int(time.time() * 1000)
        # One population of cards for history and live stream alike. The live stream continues the
        # same timeline at the same pace of event time (a card's rhythm, so its windowed features,
        # stay as in training), replayed at LIVE_RATE events/s: the last LIVE_SPAN_MS of event time.
        history = TransactionGenerator(GeneratorConfig(seed=7, cards=3000, start_ms=now_ms - DAY_MS - LIVE_SPAN_MS,
                                                       mean_gap_ms=GAP_MS, id_prefix=f"d{now_ms}"))
        produced = SyntheticProducer(settings.kafka, spec.topics.source, spec.labels.topic, history).run(
            HISTORY_EVENTS, None, backfill=True)
        console.print(f"  produced {produced.events:,} events ({produced.frauds} fraud) and {produced.labels:,} "
                      f"labels in {produced.seconds:.1f}s")
        _wait_for(watcher, before + HISTORY_EVENTS, console)
        console.print(f"  {len(watcher.rows) - before:,} predictions by {watcher.rows[-1]['model_version']}")

        _wait_for_lakehouse(settings, spec, len(watcher.rows), console)

        console.rule("3. first training from the lakehouse (champion: the baseline)")
        from_lake = {"rows": lakehouse_rows(settings, spec), "register": lambda e: register_model(settings.lakehouse, e)}
        first = retrain(settings.kafka, spec, settings.artifacts, settings.signing_key(), settings.device,
                        "auto", on_progress=lambda line: None, **from_lake)
        champion = f"{first.champion_metrics['pr_auc']:.3f}" if first.champion_metrics else "-"
        console.print(f"  {first.version}: holdout PR-AUC {first.metrics['pr_auc']:.3f} against {first.champion} "
                      f"{champion}; {'published' if first.published else 'not published'} ({first.seconds:.1f}s)")
        summary["first"] = first

        console.rule(f"4. live stream at {LIVE_RATE} events/s (the day goes on), a retrain midway that goes out "
                     "as a canary, judged live")
        prefix = history.config.id_prefix
        watcher.live_ids.update(f"{prefix}-{n}" for n in range(HISTORY_EVENTS + 1, HISTORY_EVENTS + LIVE_MAX_EVENTS + 1))
        producer = SyntheticProducer(settings.kafka, spec.topics.source, spec.labels.topic, history)
        streaming = threading.Event()
        streaming.set()

        def stream() -> None:  # a second of events at a time, until the rollout has ended (or the cap)
            while streaming.is_set() and producer.report.events < LIVE_MAX_EVENTS:
                producer.run(LIVE_RATE, float(LIVE_RATE), True)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        second_box: list = []
        retrainer = None
        lags: dict = {}
        note = ""
        rollout: dict = {}
        decisions: list[dict] = []
        ended_at = None
        ticks = 0
        client = redis_client(settings.redis_url)
        with Live(console=console, refresh_per_second=2) as view:
            t0 = time.monotonic()
            while thread.is_alive():
                if retrainer is None and time.monotonic() - t0 > LIVE_SECONDS / 3:
                    note = "retraining on everything labelled so far..."
                    retrainer = threading.Thread(target=lambda: second_box.append(retrain(
                        settings.kafka, spec, settings.artifacts, settings.signing_key(), settings.device,
                        "auto", seed=1, rollout_policy=DEMO_POLICY, **from_lake)))
                    retrainer.start()
                if second_box and "retraining" in note:
                    second = second_box[0]
                    if second.rollout is not None:
                        record(settings, second.rollout, "start", f"by the demo's retrain: steps {list(DEMO_POLICY.steps)}",
                               {"policy": second.rollout.policy})
                        note = f"{second.version} goes out as a canary: the judge steps it on or rolls it back"
                    else:
                        note = f"{second.version} was not better than {second.champion}: not rolled out"
                if second_box and second_box[0].rollout is not None and ticks % 3 == 0:  # it reads the lake
                    now_status = rollout_status(settings, spec, client)
                    decisions = now_status["decisions"]
                    if now_status["mode"] != "none":
                        rollout = now_status  # the view keeps the last figures of both versions when it ends
                    elif ended_at is None:
                        ended_at = time.monotonic()
                        last = [d for d in decisions if d["challenger"] == second_box[0].version][-1:]
                        note = f"rollout ended: {last[0]['decision']}: {last[0]['reason']}" if last else note
                done = (ended_at is not None and time.monotonic() - ended_at > 5) or (
                    second_box and second_box[0].rollout is None and time.monotonic() - t0 > LIVE_SECONDS)
                if done:
                    streaming.clear()
                lag = group_lag(settings.kafka, timeout_s=2)
                lags = {"features": lag.get(spec.stage_id("features"), {}).get(spec.topics.source),
                        "scorer": lag.get(spec.stage_id("scorer"), {}).get(spec.topics.features)}
                view.update(_view(settings, spec, watcher, producer.report.events, lags, note, rollout))
                time.sleep(1.0)
                ticks += 1
            streaming.clear()
            if retrainer is not None:
                retrainer.join()
            time.sleep(3)
            view.update(_view(settings, spec, watcher, producer.report.events, lags, note, rollout))
        summary["rollout"] = [d for d in decisions if second_box and d["challenger"] == second_box[0].version]
        summary["second"] = second_box[0] if second_box else None

        console.rule("5. analytics: Spark SQL over the lakehouse")
        _wait_for_lakehouse(settings, spec, len(watcher.rows), console)
        summary["analytics"] = _analytics(settings, spec, console)
        summary["live"] = live_metrics(settings.lakehouse, spec)
        summary["on_live_stream"] = _on_live_stream(settings, spec, watcher.live, summary)
    finally:
        watcher.stop()
        console.rule("6. eddy down")
        console.print("  stopped: " + ", ".join(stack.down(settings)))
    summary["seconds"] = round(time.time() - started, 1)
    summary["predictions"] = len(watcher.rows)
    _print_summary(summary, console)
    return summary


def _on_live_stream(settings: Settings, spec, rows: list[dict], summary: dict) -> dict[str, dict]:
    """Every model on the same events: the live stream's feature rows (as the stream computed them)
    and their labels from bronze/labels, scored by the baseline and by each retrained version."""
    from lakehouse.ingest import table_location
    from lakehouse.snapshot import read_snapshot
    from lakehouse.tables import ingested_tables
    from models.artifacts import load_artifact
    from models.baseline import baseline_model
    from models.scoring import LoadedModel
    from models.store import fetched
    from models.training import evaluate

    if not rows or spec.model.kind != "mlp":
        return {}
    labels_table = next(t for t in ingested_tables(spec) if t.topic == spec.labels.topic)
    frame = read_snapshot(table_location(settings.lakehouse, labels_table),
                          columns=[spec.labels.id, spec.labels.label]).to_pandas()
    labels = dict(zip(frame[spec.labels.id], frame[spec.labels.label], strict=True))
    rows = [r for r in rows if r["event_id"] in labels]
    y = np.array([bool(labels[r["event_id"]]) for r in rows], dtype=np.float64)
    models = {"baseline-1": LoadedModel(*baseline_model(spec))}
    for name in ("first", "second"):
        result = summary.get(name)
        if result is not None:
            with fetched(result.uri, settings.object_store) as directory:
                models[result.version] = load_artifact(directory, settings.trusted_keys(), spec.spec_hash,
                                                       list(spec.model_inputs))
    features = [r["features"] for r in rows]
    return {version: {"events": len(rows), "positives": int(y.sum()), **evaluate(model.score(features), y)}
            for version, model in models.items()}


def _table_rows(settings: Settings, path: str) -> int:
    from deltalake import DeltaTable

    try:
        return sum(int(n) for n in DeltaTable(f"{settings.lakehouse}/{path}").get_add_actions(flatten=True)
                   .column("num_records").to_pylist())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _served_rows(settings: Settings, spec) -> int:
    """gold/predictions' rows from the predictions topic (its shadow predictions come from the shadow topic)."""
    from lakehouse.snapshot import read_snapshot

    try:
        topics = read_snapshot(f"{settings.lakehouse}/gold/predictions", columns=["kafka_topic"]).column("kafka_topic")
    except Exception:  # noqa: BLE001 - not created yet
        return 0
    return int(sum(1 for t in topics.to_pylist() if t == spec.topics.predictions))


def _wait_for_lakehouse(settings: Settings, spec, predictions: int, console: Console, timeout_s: float = 300) -> None:
    """Until gold/predictions (its served rows), silver/features and bronze/labels hold as many rows as the
    predictions topic showed."""
    with console.status("") as status:

        def landed_all() -> bool:
            landed = min(_table_rows(settings, "silver/features"), _table_rows(settings, "bronze/labels"))
            if landed >= predictions:  # the read of gold/predictions only once the cheap counts are there
                landed = min(landed, _served_rows(settings, spec))
            status.update(f"lakehouse ingestion: {landed:,}/{predictions:,} rows in each table")
            return landed >= predictions

        poll(landed_all, timeout_s, every_s=1.0)
        served, every = _served_rows(settings, spec), _table_rows(settings, "gold/predictions")
    console.print(f"  the lakehouse holds {served:,} served predictions (and {every - served:,} shadow ones), "
                  f"{_table_rows(settings, 'silver/features'):,} feature rows, {_table_rows(settings, 'bronze/labels'):,} labels")


def _analytics(settings, spec, console: Console) -> dict:
    """Fraud rate and the precision of flagged events by channel and model version, in Spark SQL."""
    from deploy.lake import spark_session
    from lakehouse.query import register_tables, run_sql
    from lakehouse.tables import ingested_tables

    names = {t.topic: t.sql_name for t in ingested_tables(spec)}
    session = spark_session(settings, "eddy-retrain")  # the retrains' session, already running
    register_tables(session, settings.lakehouse, spec)
    statement = f"""
        SELECT t.channel, p.model_version AS model, count(*) AS events,
               avg(CAST(l.is_fraud AS INT)) AS fraud_rate,
               sum(CAST(p.score > {FLAG_AT} AS INT)) AS flagged,
               sum(CAST(p.score > {FLAG_AT} AND l.is_fraud AS INT)) / nullif(sum(CAST(p.score > {FLAG_AT} AS INT)), 0)
                   AS precision
        FROM {names[spec.topics.predictions]} p
        JOIN (SELECT event_id, max_by(is_fraud, label_time) AS is_fraud FROM {names[spec.labels.topic]}
              GROUP BY event_id) l ON p.event_id = l.event_id
        JOIN {names[spec.topics.source]} t ON t.event_id = p.event_id
        WHERE coalesce(p.role, 'champion') <> 'shadow'
        GROUP BY t.channel, p.model_version ORDER BY t.channel, p.model_version"""
    console.print("  " + " ".join(statement.split()))
    result = run_sql(session, statement)
    table = Table(title="fraud rate and precision of flagged events, by channel and model version")
    for column in result.columns:
        table.add_column(column)
    rows = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
    for r in rows:
        table.add_row(r["channel"], r["model"], f"{r['events']:,}", f"{r['fraud_rate']:.2%}", f"{r['flagged']:,}",
                      f"{r['precision']:.2%}" if r["precision"] is not None else "-")
    console.print(table)
    return {"rows": rows}


def _print_summary(summary: dict, console: Console) -> None:
    console.rule("summary")
    first, second = summary.get("first"), summary.get("second")
    console.print(f"  {summary['predictions']:,} predictions in {summary['seconds']:.0f}s")
    for label, result in (("first", first), ("second", second)):
        if result is None:
            continue
        champion = f"{result.champion_metrics['pr_auc']:.3f}" if result.champion_metrics else "-"
        outcome = ("rolled out as a canary" if result.rollout is not None
                   else "published" if result.published else "not published")
        console.print(f"  {label} retrain {result.version}: holdout PR-AUC {result.metrics['pr_auc']:.3f} against "
                      f"{result.champion} {champion} on the same holdout; {result.rows:,} rows, {result.seconds:.1f}s; "
                      f"{outcome}")
    for d in summary.get("rollout") or []:
        console.print(f"  rollout: {d['decided_at']:%H:%M:%S} step {d['percent']}%: {d['decision']}: {d['reason']}")
    for version, live in sorted((summary.get("live") or {}).items()):
        pr_auc = f"{live['pr_auc']:.3f}" if live["pr_auc"] is not None else "-"
        console.print(f"  served (gold.predictions joined with bronze.labels): {version}: {live['labelled']:,} labelled "
                      f"predictions, {live['positives']} fraud, PR-AUC {pr_auc}")
    for version, m in (summary.get("on_live_stream") or {}).items():
        console.print(f"  every model on the whole live stream ({m['events']:,} events, {m['positives']} fraud): "
                      f"{version}: PR-AUC {m['pr_auc']:.3f}, ROC-AUC {m['roc_auc']:.3f}")
