"""The transactional consume-process-produce loop: outputs and consumed offsets commit together.

One batch is one Kafka transaction, so a read_committed reader sees each batch's output exactly once,
also when the process is killed mid-batch (the next owner of the partitions redoes the batch).
Batches are as large as what has arrived: one record when the stream is slow (latency), up to
batch_size when it backs up (throughput), never a wait for a batch to fill."""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import (
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from redis.exceptions import RedisError

from streams import stores
from streams.guards import STUCK_CALL_S, Backoff, StallGuard, Watchdog
from streams.kafka import KafkaConfig, partitions_text
from streams.telemetry import StageMetrics

log = logging.getLogger(__name__)


YOUNG_GC_THRESHOLD = 50_000


class Output(Protocol):
    """Where a step produces during a batch: the loop's transactional Producer, or a stand-in (a
    replay's discard, the Faust agent's collector, a benchmark's counter)."""

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, *args, **kwargs) -> None:
        """Queue one record for `topic`; with the loop's producer it becomes visible only when the
        batch's transaction commits."""


class HeldRecord:
    """A record held in memory with the confluent-kafka Message methods the stages read, for feeding
    a stage without a broker (benchmarks of its per-batch step, unit tests)."""

    __slots__ = ("_value", "_key", "_topic", "_partition", "_offset", "_timestamp")

    def __init__(self, value: bytes | None, key: bytes | None = None, topic: str = "", partition: int = 0,
                 offset: int = 0, timestamp: int = 0) -> None:
        self._value, self._key, self._topic, self._partition, self._offset = value, key, topic, partition, offset
        self._timestamp = timestamp

    def value(self) -> bytes | None:
        """The value given (None stands for a tombstone)."""
        return self._value

    def key(self) -> bytes | None:
        """The key given, or None."""
        return self._key

    def topic(self) -> str:
        """The topic given (empty by default)."""
        return self._topic

    def partition(self) -> int:
        """The partition given."""
        return self._partition

    def offset(self) -> int:
        """The offset given."""
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        """(TIMESTAMP_CREATE_TIME, the timestamp given in ms), or (TIMESTAMP_NOT_AVAILABLE, 0) when none was."""
        return (TIMESTAMP_CREATE_TIME, self._timestamp) if self._timestamp > 0 else (TIMESTAMP_NOT_AVAILABLE, 0)

    def headers(self) -> None:
        """Always None: a held record carries no headers."""
        return None

    def error(self) -> None:
        """Always None: a held record is never a consumer error event."""
        return None


class Step(Protocol):
    """The work of one stage. process() is called once per batch, inside the batch's transaction;
    everything it produces on `out` commits with the batch's offsets or not at all.

    A step may also define assigned(partitions) and revoked(partitions), called between batches
    when the group gives or takes source partitions (a stateful step restores or drops their
    state; each assigned TopicPartition carries the group's committed offset, negative when there
    is none), and aborted(batch, committed), called after a batch's transaction was aborted and
    before it is redone, with the committed offsets of the batch's partitions (a stateful step
    forgets what that batch changed). A stateful step names the topics its state goes to in
    checkpoint_topics: at least once (streams.delivery), those records still commit with the offsets."""

    def process(self, messages: Sequence, out: Output) -> None:
        """Handle one non-empty batch of records (no error events among them), producing on `out`. A
        KafkaException that requires an abort redoes the batch; any other exception ends the loop."""


@dataclass
class LoopStats:
    """What a loop has done since it started, for its stage's heartbeat and the benchmark."""

    batches: int = 0
    consumed: int = 0
    aborted: int = 0
    started: float = field(default_factory=time.monotonic)
    # the latest batches: (records, ms processing, ms committing), for heartbeats
    recent: deque = field(default_factory=lambda: deque(maxlen=256))

    def rate(self) -> float:
        """Records consumed per second since the loop started."""
        return self.consumed / max(1e-9, time.monotonic() - self.started)

    def summary(self) -> dict[str, float]:
        """Median batch size and the median and worst processing and commit times of the recent batches."""
        recent = list(self.recent)
        if not recent:
            return {}
        sizes, work, commit = (sorted(column) for column in zip(*recent, strict=True))
        mid = len(recent) // 2
        return {"batch_p50": sizes[mid], "process_ms_p50": round(work[mid], 1), "process_ms_max": round(work[-1], 1),
                "commit_ms_p50": round(commit[mid], 1), "commit_ms_max": round(commit[-1], 1)}


class TransactionalLoop:
    """Reads `topics` as consumer group `group`, runs `step` per batch, commits in one transaction."""

    def __init__(
        self,
        kafka: KafkaConfig,
        group: str,
        topics: Sequence[str],
        transactional_id: str,
        batch_size: int = 2000,
        batch_wait_s: float = 0.1,
        from_beginning: bool = True,
        min_interval_s: float = 0.0,
        commit_gap_s: float = 0.001,
        metrics: StageMetrics | None = None,
    ) -> None:
        self.topics = list(topics)
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s  # how long one poll waits for the first record of a batch
        # The broker finishes a committed transaction (its markers) just after the commit returns;
        # a next transaction that registers a partition before that is refused and librdkafka
        # retries it 20 ms later. Leaving this gap after a commit avoids most of those stalls.
        self.commit_gap_s = commit_gap_s
        # Each transaction costs the broker milliseconds of CPU whatever its size (~5 ms on a 2-core
        # machine), so a stage starts at most one per min_interval_s: records wait up to that long,
        # and batches grow with the load. It bounds the broker's work, not the stage's throughput.
        self.min_interval_s = min_interval_s
        self._committed_at = 0.0
        self._began_at = 0.0
        self._frozen_at = 0.0
        self.consumer = Consumer(kafka.client(**{
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "isolation.level": "read_committed",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            # a long poll: a fetch returns as soon as records are there, else after 100 ms, so an
            # idle stage costs the broker 10 requests a second (each costs it ~0.5 ms of CPU here)
            "fetch.wait.max.ms": 100,
            "fetch.queue.backoff.ms": 1,
        }))
        self.producer = Producer(kafka.client(**{
            "transactional.id": transactional_id,
            # a commit sends what waits at once, so lingering costs a slow stream nothing and
            # gives a fast one fewer, larger produce requests (less broker work per record)
            "linger.ms": 5,
            "batch.num.messages": 10000,
            "compression.type": "lz4",
            "transaction.timeout.ms": 60000,
            # retries of a transaction step refused while the previous commit completes (see
            # commit_gap_s) come after 5 ms rather than the 100 ms default
            "retry.backoff.ms": 5,
            "queue.buffering.max.messages": 1_000_000,
        }))
        self.stats = LoopStats()
        self._committed: dict[tuple[str, int], int] = {}
        self.metrics: StageMetrics | None = metrics
        self._faults = Backoff(log)
        self._lag_at = 0.0
        self._watchdog = Watchdog(STUCK_CALL_S)
        self._stalls = StallGuard(self.consumer)
        # The Kafka timestamps (ms) a batch's latency is measured from: its records' own by default.
        self.latency_from: Callable[[list], Sequence[int]] = _timestamps

    def run(self, step: Step, should_stop: Callable[[], bool], on_batch: Callable[[int], None] | None = None,
            on_idle: Callable[[], None] | None = None) -> None:
        """Batches until should_stop(); on_idle() runs between polls that found nothing (in this thread)."""
        # A batch of 4,096 records allocates some 12k containers (parsed records, rows, tuples): at
        # the default young-generation threshold of 700 the collector ran ~17 times a batch, 13% of
        # the scorer's step; at this one it runs about once.
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        with self._watchdog:
            self.producer.init_transactions(30)
        assigned, revoked = getattr(step, "assigned", None), getattr(step, "revoked", None)
        self._started(step)

        def on_assign(consumer, partitions: list[TopicPartition]) -> None:
            log.info("partitions assigned: %s", partitions_text(partitions))
            if assigned is not None and partitions:
                with self._watchdog:
                    committed = consumer.committed(partitions, timeout=30)
                assigned(committed)

        def on_revoke(_consumer, partitions: list[TopicPartition]) -> None:
            log.info("partitions revoked: %s", partitions_text(partitions))
            self._before_revoke()
            for tp in partitions:
                self._committed.pop((tp.topic, tp.partition), None)
            if revoked is not None:
                revoked(partitions)

        self.consumer.subscribe(self.topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)
        try:
            while not should_stop():
                self._export_lag()
                messages = self.poll_batch()
                if not messages:
                    self._stalls.idle()
                    if self._idle(step):
                        continue
                    self._commit_idle_positions()
                    if on_idle is not None:
                        on_idle()
                    continue
                batch = [m for m in messages if m.error() is None]
                if len(batch) != len(messages):
                    for m in messages:
                        if m.error() is not None and m.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("consume error: %s", m.error())
                if batch:
                    self._commit_batch(step, batch)
                    if on_batch is not None:
                        on_batch(len(batch))
        finally:
            self.close()

    def _export_lag(self, every_s: float = 1.0) -> None:
        """The consumer lag per assigned partition into the metrics, about once a second, from the
        high watermarks the fetches brought (no request of its own)."""
        now = time.monotonic()
        if self.metrics is None or now - self._lag_at < every_s:
            return
        self._lag_at = now
        lags = {}
        for tp in self.consumer.position(self.consumer.assignment()):
            _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and tp.offset >= 0:
                lags[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        self.metrics.set_lag(lags)

    def poll_batch(self) -> list:
        """What has arrived, up to batch_size; waits up to batch_wait_s for the first record only."""
        self._freeze_heap()
        wait = max(self._committed_at + self.commit_gap_s, self._paced_until()) - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        consume = self.consumer.consume
        messages = consume(self.batch_size, 0)
        if not messages:
            messages = consume(1, self.batch_wait_s)
            if messages and self.batch_size > 1:
                messages += consume(self.batch_size - 1, 0)
        return messages

    def _freeze_heap(self, every_s: float = 1.0) -> None:
        """Move what the process holds into the collector's permanent generation about once a
        second. A stage's long-lived state (a feature engine's entities: millions of objects) would
        otherwise be traversed by every full collection: pauses of ~0.5 s measured at 75k entities.
        Frozen objects are still freed by reference counting; the state holds no reference cycles."""
        now = time.monotonic()
        if now - self._frozen_at >= every_s:
            gc.freeze()
            self._frozen_at = now

    def _commit_batch(self, step: Step, batch: list) -> None:
        """One batch in one transaction. A fault that a wait cures (Redis unreachable, paused or
        refusing writes; the broker unavailable or slow; a coordinator moving) aborts the batch,
        which is redone after a backoff: nothing of it commits meanwhile. A fatal error (fenced,
        misconfigured) ends the process, and supervision starts it again."""
        self._began_at = began = time.perf_counter()
        try:
            self.producer.begin_transaction()
            step.process(batch, self.producer)
            processed = time.perf_counter()
            offsets = next_offsets(batch)
            self._finish(lambda: self.producer.send_offsets_to_transaction(
                offsets, self.consumer.consumer_group_metadata(), 30))
            self._finish(lambda: self.producer.commit_transaction(30))
            self._committed_at = time.perf_counter()
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal() or conflicting(error) or not (error.txn_requires_abort() or error.retriable()):
                raise
            self._redo(step, batch, f"Kafka: {error.str()}")
            return
        except RedisError as exc:
            if not stores.is_transient(exc):
                raise
            self._redo(step, batch, f"Redis: {exc}")
            if self.metrics is not None:
                self.metrics.redis_errors.inc()
            return
        self._faults.cleared()
        self.stats.batches += 1
        self.stats.consumed += len(batch)
        process_s, commit_s = processed - began, self._committed_at - processed
        self.stats.recent.append((len(batch), 1000 * process_s, 1000 * commit_s))
        self._committed.update({(tp.topic, tp.partition): tp.offset for tp in offsets})
        if self.metrics is not None:
            self.metrics.consumed(batch)
            self.metrics.batch(len(batch), process_s, commit_s)
            self.metrics.latencies(time.time() * 1000, self.latency_from(batch))

    # -- what the at-least-once loop (streams.delivery) changes --------------------------------------------
    def _started(self, step: Step) -> None:
        """Called once run() has the producer ready, before the first poll."""

    def _before_revoke(self) -> None:
        """Called as the group takes partitions away, before the step hears of it."""

    def _idle(self, step: Step) -> bool:
        """Called when a poll found nothing; True skips the idle work (offsets past markers, on_idle)."""
        return False

    def _paced_until(self) -> float:
        """The earliest perf_counter() time the next batch may begin: min_interval_s after the last one began
        (each transaction costs the broker CPU)."""
        return self._began_at + self.min_interval_s

    def _finish(self, call: Callable[[], None]) -> None:
        """A step of the transaction's end, made again while the error is retriable and the transaction
        need not be aborted (a timeout, a coordinator moving), for as long as that lasts.

        It is never given up half way: librdkafka keeps a call that timed out pending and refuses every
        other transaction call ("Conflicting commit_transaction API call is already in progress") until
        the same call is made again to its end. Giving up after a minute and aborting was seen to leave
        a scorer refused on every call after a network partition healed. A transaction the coordinator
        timed out meanwhile comes back as one to abort, which ends the retries."""
        while True:
            try:
                with self._watchdog:
                    call()
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.fatal() or error.txn_requires_abort() or not error.retriable() or conflicting(error):
                    raise
                self._faults.waiting(f"Kafka: {error.str()}")

    def _abort(self) -> None:
        """Abort the open transaction, the call made again until it ends as every step of a transaction's
        end is (_finish): an abort that timed out while the broker was away stays pending, and librdkafka
        refuses every other call until it is made again. Nothing to abort (none begun, or a commit that
        went through) is no error here."""
        try:
            self._finish(lambda: self.producer.abort_transaction(30))
        except KafkaException as exc:
            if exc.args[0].fatal() or conflicting(exc.args[0]):
                raise
            log.debug("abort: %s", exc.args[0])

    def _redo(self, step: Step, batch: list, reason: str) -> None:
        """Abort what the batch produced, seek back to where the group's committed offsets say the
        batch begins (a stateful step rebuilds its state from the same offsets), and wait before it is
        tried again.

        The committed offsets decide, not the batch's own first offsets: when a commit fails, whether
        it went through is not known (the broker may complete a commit whose answer was lost when the
        connection broke, then refuse the abort), and a batch that did commit must not run again."""
        self._faults.waiting(reason)
        self.stats.aborted += 1
        if self.metrics is not None and reason.startswith("Kafka"):
            self.metrics.kafka_errors.inc()
        self._abort()
        touched = sorted({(m.topic(), m.partition()) for m in batch})
        committed = self._committed_offsets([TopicPartition(t, p) for t, p in touched])
        aborted = getattr(step, "aborted", None)
        if aborted is not None:
            while True:  # a stateful step rebuilds from Kafka and Redis, which may still be away
                try:
                    aborted(batch, committed)
                    break
                except RedisError as exc:
                    if not stores.is_transient(exc):
                        raise
                    self._faults.waiting(f"Redis: {exc}")
        self._rewind(batch, committed)

    def _committed_offsets(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The group's committed offsets (stable ones: offsets of a transaction still completing are
        waited for), asked again until the coordinator answers for every partition."""
        while True:
            try:
                committed = self.consumer.committed(partitions, timeout=30)
            except KafkaException as exc:
                if exc.args[0].fatal():
                    raise
                self._faults.waiting(f"Kafka: {exc.args[0].str()}")
                continue
            failed = [(tp, tp.error) for tp in committed if tp.error is not None]
            if not failed:
                return committed
            tp, error = failed[0]
            self._faults.waiting(f"Kafka: committed offsets of {tp.topic}[{tp.partition}]: {error.str()}")

    def _commit_idle_positions(self) -> None:
        """When idle, move the committed offsets past transaction markers at the end of the input.

        After a transactional producer's batch, the log ends with a commit marker one past the last
        record, so offsets committed as last + 1 show a lag of 1 per partition until more data comes.
        Once the consumer is idle its position has passed the marker: commit that (in an empty
        transaction, since offsets of a transactional loop are only committed in transactions)."""
        assignment = self.consumer.assignment()
        if not assignment:
            return
        positions = [tp for tp in self.consumer.position(assignment) if tp.offset >= 0]
        ahead = [tp for tp in positions if tp.offset > self._committed.get((tp.topic, tp.partition), -1)]
        if not ahead:
            return
        try:
            # Each call under the watchdog like every batch's (after a broker restart, librdkafka's
            # send_offsets_to_transaction was seen to never return despite its 30 s timeout), and made
            # again to its end when it times out, as a batch's are.
            self.producer.begin_transaction()
            self._finish(lambda: self.producer.send_offsets_to_transaction(
                ahead, self.consumer.consumer_group_metadata(), 30))
            self._finish(lambda: self.producer.commit_transaction(30))
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal() or conflicting(error) or not (error.txn_requires_abort() or error.retriable()):
                raise
            self._abort()  # the idle commit is tried again when next idle
            return
        self._committed.update({(tp.topic, tp.partition): tp.offset for tp in ahead})

    def _rewind(self, batch: list, committed: list[TopicPartition]) -> None:
        """Seek each partition of an aborted batch to the group's committed offset, or to the batch's
        first offset where the group has committed none."""
        first: dict[tuple[str, int], int] = {}
        for m in batch:
            first.setdefault((m.topic(), m.partition()), m.offset())
        for tp in committed:
            offset = tp.offset if tp.offset >= 0 else first[(tp.topic, tp.partition)]
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))

    def close(self) -> None:
        """Close the consumer (leaving the group) and flush the producer; run() calls it when it ends."""
        try:
            self.consumer.close()
        finally:
            self.producer.flush(10)


def conflicting(error: KafkaError) -> bool:
    """librdkafka refuses a transaction call while another one is pending (a timed-out call not yet made
    again to its end). The loops never leave one so (_finish); should one be, nothing but that same call
    clears it, so the process ends and supervision starts it again, its new producer fencing the old."""
    return error.code() == KafkaError._CONFLICT


def next_offsets(batch: list) -> list[TopicPartition]:
    """Each partition of the batch with the offset after its last record: what a commit of it stores."""
    last: dict[tuple[str, int], int] = {}
    for m in batch:
        last[(m.topic(), m.partition())] = m.offset()
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def _timestamps(batch: list) -> list[int]:
    """Each record's Kafka timestamp in ms (<= 0 when it has none)."""
    return [m.timestamp()[1] for m in batch]
