"""The transactional consume-process-produce loop: outputs and consumed offsets commit together.

One batch is one Kafka transaction, so a read_committed reader sees each batch's output exactly once,
also when the process is killed mid-batch (the next owner of the partitions redoes the batch)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streams.kafka import KafkaConfig

log = logging.getLogger(__name__)


class Output(Protocol):
    def produce(self, topic: str, value: bytes | None, key: bytes | None = None, headers=None) -> None: ...


class Step(Protocol):
    """The work of one stage. process() is called once per batch, inside the batch's transaction;
    everything it produces on `out` commits with the batch's offsets or not at all."""

    def process(self, messages: Sequence, out: Output) -> None: ...


@dataclass
class LoopStats:
    batches: int = 0
    consumed: int = 0
    aborted: int = 0
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        return self.consumed / max(1e-9, time.monotonic() - self.started)


class TransactionalLoop:
    """Reads `topics` as consumer group `group`, runs `step` per batch, commits in one transaction."""

    def __init__(
        self,
        kafka: KafkaConfig,
        group: str,
        topics: Sequence[str],
        transactional_id: str,
        batch_size: int = 2000,
        batch_wait_s: float = 0.02,
        from_beginning: bool = True,
    ) -> None:
        self.topics = list(topics)
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.consumer = Consumer(kafka.client(**{
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "isolation.level": "read_committed",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": 10,
        }))
        self.producer = Producer(kafka.client(**{
            "transactional.id": transactional_id,
            "linger.ms": 2,
            "batch.num.messages": 10000,
            "compression.type": "lz4",
            "transaction.timeout.ms": 60000,
        }))
        self.stats = LoopStats()
        self._committed: dict[tuple[str, int], int] = {}

    def run(self, step: Step, should_stop: Callable[[], bool], on_batch: Callable[[int], None] | None = None,
            on_idle: Callable[[], None] | None = None) -> None:
        """Batches until should_stop(); on_idle() runs between polls that found nothing (in this thread)."""
        self.producer.init_transactions(30)
        self.consumer.subscribe(self.topics)
        try:
            while not should_stop():
                messages = self.consumer.consume(self.batch_size, self.batch_wait_s)
                if not messages:
                    self._commit_idle_positions()
                    if on_idle is not None:
                        on_idle()
                    continue
                batch = [m for m in messages if m.error() is None]
                for m in messages:
                    if m.error() is not None and m.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consume error: %s", m.error())
                if batch:
                    self._commit_batch(step, batch)
                    if on_batch is not None:
                        on_batch(len(batch))
        finally:
            self.close()

    def _commit_batch(self, step: Step, batch: list) -> None:
        self.producer.begin_transaction()
        try:
            step.process(batch, self.producer)
            offsets = _next_offsets(batch)
            self.producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
            self.producer.commit_transaction(30)
        except KafkaException as exc:
            error = exc.args[0]
            if not error.txn_requires_abort():
                raise
            log.warning("transaction aborted, rewinding the batch: %s", error)
            self.producer.abort_transaction(30)
            self.stats.aborted += 1
            self._rewind(batch)
            return
        self.stats.batches += 1
        self.stats.consumed += len(batch)
        self._committed.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

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
        self.producer.begin_transaction()
        try:
            self.producer.send_offsets_to_transaction(ahead, self.consumer.consumer_group_metadata(), 30)
            self.producer.commit_transaction(30)
        except KafkaException as exc:
            if not exc.args[0].txn_requires_abort():
                raise
            self.producer.abort_transaction(30)
            return
        self._committed.update({(tp.topic, tp.partition): tp.offset for tp in ahead})

    def _rewind(self, batch: list) -> None:
        """Seek back to the first offset of the aborted batch in each partition, so it is redone."""
        first: dict[tuple[str, int], int] = {}
        for m in batch:
            first.setdefault((m.topic(), m.partition()), m.offset())
        for (topic, partition), offset in first.items():
            self.consumer.seek(TopicPartition(topic, partition, offset))

    def close(self) -> None:
        try:
            self.consumer.close()
        finally:
            self.producer.flush(10)


def _next_offsets(batch: list) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for m in batch:
        last[(m.topic(), m.partition())] = m.offset()
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
