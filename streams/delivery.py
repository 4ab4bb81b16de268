"""The at-least-once loop: a TransactionalLoop whose outputs leave at once, and whose state and source
offsets still commit together.

Outputs (features, predictions, dead letters) go out through an idempotent producer of their own, visible
a few milliseconds after the event instead of with the next commit. The stage's checkpoint (the records
of its step's checkpoint_topics, its state, and the source offsets) commits in one transaction at most
every min_interval_s, once every output sent before it was delivered. A restart resumes from the last
checkpoint with the state as of those offsets, so what it produces again is what it produced before: the
same records (a prediction's scoring time and the last float32 digits of its score aside), never a lost
one. A fault the loop waits out redoes everything since the last checkpoint the same way."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from redis.exceptions import RedisError

from features.spec import GUARANTEES
from streams import stores
from streams.kafka import KafkaConfig
from streams.loop import Step, TransactionalLoop, conflicting, next_offsets

log = logging.getLogger(__name__)

EXACTLY_ONCE, AT_LEAST_ONCE = GUARANTEES


def loop_for(guarantee: str, kafka: KafkaConfig, *args: Any, **kwargs: Any) -> TransactionalLoop:
    """The loop that keeps `guarantee` (the spec's), with TransactionalLoop's arguments."""
    if guarantee == EXACTLY_ONCE:
        return TransactionalLoop(kafka, *args, **kwargs)
    if guarantee == AT_LEAST_ONCE:
        return AtLeastOnceLoop(kafka, *args, **kwargs)
    raise ValueError(f"guarantee {guarantee!r}: one of {', '.join(GUARANTEES)}")


class AtLeastOnceLoop(TransactionalLoop):
    """Runs a step at least once (see the module): batches go as soon as they are there, checkpoints at
    most every min_interval_s."""

    def __init__(self, kafka: KafkaConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(kafka, *args, **kwargs)
        self.outputs = Producer(kafka.client(**{
            "enable.idempotence": True,
            "linger.ms": 1,
            "batch.num.messages": 10000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
            "delivery.report.only.error": True,
            "on_delivery": self._undelivered,
        }))
        self._open = False  # a checkpoint's transaction is open
        self._pending: dict[tuple[str, int], int] = {}  # offsets processed since the last checkpoint
        self._span: dict[tuple[str, int], Any] = {}     # the first record of each partition since then
        self._delivery_error: KafkaError | None = None
        self._route: _Route | None = None

    def _started(self, step: Step) -> None:
        self._route = _Route(self.producer, self.outputs, frozenset(getattr(step, "checkpoint_topics", ())))

    def _before_revoke(self) -> None:
        if self._open:  # what was processed is checkpointed before the partitions go
            self._checkpoint_or_drop()

    def _idle(self, step: Step) -> bool:
        if not self._open:
            return False
        self._deliver(step, [])
        return True

    def _paced_until(self) -> float:
        return 0.0  # a batch goes as soon as it is there: only checkpoints keep min_interval_s apart

    def _commit_batch(self, step: Step, batch: list) -> None:
        self._deliver(step, batch)

    def _deliver(self, step: Step, batch: list) -> None:
        """At least once: one batch processed, its outputs sent at once, and a checkpoint when the last
        is min_interval_s old (an empty batch: when idle). A fault redoes every batch since the last
        checkpoint, from the group's committed offsets, as _commit_batch redoes one."""
        assert self._route is not None
        began = time.perf_counter()
        checkpoint_s = 0.0
        try:
            if batch:
                if not self._open:
                    self.producer.begin_transaction()
                    self._open = True
                for m in batch:
                    self._span.setdefault((m.topic(), m.partition()), m)
                step.process(batch, self._route)
                self.outputs.poll(0)
                self._pending.update(((tp.topic, tp.partition), tp.offset) for tp in next_offsets(batch))
            processed = time.perf_counter()
            if self._open and (not batch or processed - self._committed_at >= self.min_interval_s):
                self._checkpoint()
                checkpoint_s = time.perf_counter() - processed
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal() or conflicting(error) or not (error.txn_requires_abort() or error.retriable()):
                raise
            self._redo_since_checkpoint(step, f"Kafka: {error.str()}")
            return
        except RedisError as exc:
            if not stores.is_transient(exc):
                raise
            self._redo_since_checkpoint(step, f"Redis: {exc}")
            if self.metrics is not None:
                self.metrics.redis_errors.inc()
            return
        if not batch:
            return
        self._faults.cleared()
        self.stats.batches += 1
        self.stats.consumed += len(batch)
        self.stats.recent.append((len(batch), 1000 * (processed - began), 1000 * checkpoint_s))
        if self.metrics is not None:
            self.metrics.consumed(batch)
            self.metrics.batch(len(batch), processed - began, checkpoint_s)
            self.metrics.latencies(time.time() * 1000, self.latency_from(batch))

    def _checkpoint(self) -> None:
        """Every output sent so far delivered, then the checkpoint's records and the processed offsets
        committed in its transaction."""
        with self._watchdog:
            undelivered = self.outputs.flush(30)
        if undelivered:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"{undelivered} outputs not delivered in 30 s",
                                            retriable=True))
        if self._delivery_error is not None:
            error, self._delivery_error = self._delivery_error, None
            raise KafkaException(KafkaError(error.code(), f"an output was not delivered: {error.str()}",
                                            retriable=True))
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._pending.items()]
        if offsets:
            self._finish(lambda: self.producer.send_offsets_to_transaction(
                offsets, self.consumer.consumer_group_metadata(), 30))
        self._finish(lambda: self.producer.commit_transaction(30))
        self._open = False
        self._committed_at = time.perf_counter()
        self._committed.update(self._pending)
        self._pending.clear()
        self._span.clear()

    def _checkpoint_or_drop(self) -> None:
        """A checkpoint before partitions are taken away; if it fails, what it held is processed again by
        their next owner (at least once), and this transaction is aborted."""
        try:
            self._checkpoint()
        except KafkaException as exc:
            if exc.args[0].fatal():
                raise
            log.warning("checkpoint before a rebalance failed, the next owner redoes it: %s", exc.args[0])
            self._abort()
            self._open = False
            self._pending.clear()
            self._span.clear()

    def _redo_since_checkpoint(self, step: Step, reason: str) -> None:
        """Everything since the last checkpoint is redone: the outputs already sent are sent again (the
        same records), the checkpoint's transaction is aborted and the state rebuilt as checkpointed."""
        span = list(self._span.values())
        self._open = False
        self._pending.clear()
        self._span.clear()
        self._delivery_error = None
        if span:
            self._redo(step, span, reason)
        else:
            self._faults.waiting(reason)
            self._abort()

    def _undelivered(self, error: KafkaError | None, _msg: Any) -> None:
        """The outputs producer's report of a record it could not deliver (it reports no other)."""
        if error is not None and self._delivery_error is None:
            self._delivery_error = error

    def close(self) -> None:
        """A last checkpoint, so a planned restart sends nothing twice; then as TransactionalLoop, and the
        outputs flushed."""
        try:
            if self._open:
                self._checkpoint_or_drop()
            super().close()
        finally:
            self.outputs.flush(10)


class _Route:
    """The Output of a step at least once: records of its checkpoint topics (a stateful step's state) into
    the checkpoint's transaction, every other one at once to the outputs producer."""

    __slots__ = ("checkpoint", "outputs", "topics")

    def __init__(self, checkpoint: Producer, outputs: Producer, topics: frozenset[str]) -> None:
        self.checkpoint, self.outputs, self.topics = checkpoint, outputs, topics

    def produce(self, topic: str, *args, **kwargs) -> None:
        (self.checkpoint if topic in self.topics else self.outputs).produce(topic, *args, **kwargs)
