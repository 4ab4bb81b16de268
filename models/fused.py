"""The fused stage: the whole online path for the native engine's partitions in one process and one
Kafka transaction per batch.

Split, an event crosses two transactional hops (source -> features by the engine, features ->
predictions by the scorer, each committing about every 50 ms) and three processes, with the online
writer beside them. Fused, one batch of source records is validated and deduplicated, gets its
feature rows on the live entity states, has each entity's newest row written to the online store
(Feast's Redis layout, pipelined; a row never replaces a newer one, so a redone batch moves no value
back), is scored by one model call with the model the update listener swapped in, and its features,
predictions, dead letters and entity states commit with the source offsets in one transaction. A
batch that fails (Redis or the broker away) is aborted and redone from the committed offsets, so
read_committed readers see each event's row and prediction once, as with the split stages.

The split stages stay: for the Faust and Flink engines, and for scorers scaled apart from the engine
(a GPU pool). Both give the same rows and predictions (tests/integration/test_engine_kill.py)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from redis.exceptions import RedisError

from features.feast_repo import feature_dtypes, feature_store, view_name
from features.windows import FeatureRow
from models.scorer import DRIFT_EVERY_S, Scorer, ScorerConfig, beat_fields, export_counts, report_drift, source_position
from streams.engines import native_engine
from streams.engines.config import STAGE, EngineConfig
from streams.engines.native_engine import CHECKPOINT_S, NativeStep, build_native
from streams.loop import HeldRecord, Output
from streams.metrics import Heartbeat
from streams.online_writer import COMPONENT as WRITER
from streams.online_writer import WriterStats, newest, write_latest
from streams.stores import redis_client
from streams.telemetry import StageMetrics

log = logging.getLogger(__name__)
NAME = "fused"


class FusedStep:
    """The TransactionalLoop step of the fused stage: the engine's step, then the online store write and
    the scorer's step on the feature rows the engine made, held in memory at their source positions."""

    def __init__(self, engine: NativeStep, scorer: Scorer, rows_writer) -> None:
        self.engine, self.scorer, self.rows_writer = engine, scorer, rows_writer
        self.spec = engine.spec
        self.writer = WriterStats()
        self.rows: list[tuple[HeldRecord, str, int, FeatureRow]] = []
        self.checkpoint_topics = engine.checkpoint_topics
        engine.rows_out = self.rows
        scorer.position = source_position

    # partitions come and go, and aborted batches are undone, in the engine's state only: the online
    # store write is idempotent, and the scorer's history appends once per source position
    def assigned(self, partitions: list[TopicPartition]) -> None:
        self.engine.assigned(partitions)

    def revoked(self, partitions: list[TopicPartition]) -> None:
        self.engine.revoked(partitions)

    def aborted(self, batch: Sequence, committed: list[TopicPartition]) -> None:
        self.engine.aborted(batch, committed)

    def process(self, messages: Sequence, out: Output) -> None:
        """One batch inside its transaction: features (and dead letters, entity states), the online store
        write, then the predictions."""
        rows = self.rows
        rows.clear()
        self.engine.process(messages, out)
        if not rows:
            return
        writer = self.writer
        writer.events += len(rows)
        late = sum(1 for r in rows if r[3].late)
        writer.late += late
        timely = rows if not late else [r for r in rows if not r[3].late]
        write_latest(self.spec, self.rows_writer, newest(((k, t, r.features) for _, k, t, r in timely), writer),
                     writer)
        self.scorer.process([r[0] for r in rows], out)


def run_fused(engine: EngineConfig, scoring: ScorerConfig, feast_dir: Path, metrics: StageMetrics | None = None,
              checkpoint_s: float = CHECKPOINT_S) -> None:
    """Run the fused stage in this process until SIGTERM: it beats as the features, online-writer and
    scorer stages (so `eddy status`, the rollout judge and the tools read it as they read those), and
    with `metrics` exports all three stages' counts on one endpoint."""
    import torch

    from streams.feast_redis import FeastRedisWriter

    torch.set_num_threads(1)
    spec = engine.spec
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client = redis_client(engine.redis_url)
    store = feature_store(spec, feast_dir, engine.redis_url)
    rows_writer = FeastRedisWriter(store, view_name(spec), spec.key, feature_dtypes(spec), client)
    engine_step, loop = build_native(engine, client, checkpoint_s, replica=scoring.replica, metrics=metrics)
    scorer = Scorer(scoring, client)
    scorer.metrics = metrics
    step = FusedStep(engine_step, scorer, rows_writer)
    beats = {name: Heartbeat(client, spec.name, name) for name in (STAGE, WRITER, "scorer")}

    def beat() -> None:
        if metrics is not None:
            native_engine.export_counts(engine_step, metrics)
            export_counts(scorer, metrics)
            metrics.refusals(engine_step.door.counts.refused + engine_step.refusals + scorer.refusals)
            metrics.total(metrics.state_writes, engine_step.written + step.writer.rows)
        seen, fields = native_engine.beat_fields(engine_step, loop, stages=NAME)
        beats[STAGE].beat(seen, force=True, **fields)
        beats[WRITER].beat(step.writer.events, force=True, **writer_fields(step.writer))
        beats["scorer"].beat(scorer.rows, force=True, **beat_fields(scorer), stages=NAME)

    def beat_every_second() -> None:
        ticks = 0
        while not stop.wait(1.0):
            try:
                beat()
                ticks += 1
                if ticks % DRIFT_EVERY_S == 0:
                    report_drift(scorer, client, scoring.replica, metrics)
            except RedisError as exc:  # reported again next time
                log.warning("heartbeat or drift not reported: %s", exc)

    scorer.listener.start()
    try:
        scorer.wait_for_model()
        beat()
        threading.Thread(target=beat_every_second, name="heartbeat", daemon=True).start()
        log.info("fused stage: %s -> %s, Feast view %r and %s with model %s, one transaction per batch",
                 spec.topics.source, spec.topics.features, view_name(spec), spec.topics.predictions,
                 scorer.serving.version if scorer.serving is not None else None)
        loop.run(step, stop.is_set, on_idle=scorer.swap_if_ready)
    finally:
        stop.set()
        scorer.listener.stop()
        with contextlib.suppress(RedisError):  # the last counts; Redis may be what ended the stage
            beat()


def writer_fields(stats: WriterStats) -> dict[str, Any]:
    """The online writer's heartbeat fields, from the fused stage's writes."""
    return dict(rows=stats.rows, batches=stats.batches, late=stats.late, bad=stats.bad, retries=stats.retries,
                stages=NAME)
