"""A transaction whose commit went through but whose answer was lost (the connection broke, as when the
only broker is killed): the transactional loop must not run that batch again. It resumes from the group's
committed offsets, so every record is copied exactly once."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException

from streams.kafka import ensure_topics
from streams.loop import TransactionalLoop
from tests.kafka_helpers import Background, produce_all, read_committed

pytestmark = pytest.mark.kafka
RECORDS, BATCH = 600, 50


class Copy:
    """A stand-in stage: each record to the output topic as it is."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def process(self, messages, out) -> None:
        for msg in messages:
            out.produce(self.topic, msg.value(), msg.key())


class CommitAnswerLost:
    """The loop's real producer, except that its `nth` commit goes through and then reports an error that
    requires an abort, as when the broker's answer is lost with the connection."""

    def __init__(self, producer, nth: int) -> None:
        self.producer, self.nth, self.commits = producer, nth, 0

    def __getattr__(self, name: str):
        return getattr(self.producer, name)

    def commit_transaction(self, *args) -> None:
        self.producer.commit_transaction(*args)
        self.commits += 1
        if self.commits == self.nth:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "injected: the commit's answer was lost",
                                            txn_requires_abort=True))


def test_a_batch_whose_commit_went_through_unanswered_is_not_run_again(settings):
    source, output = f"src-{uuid.uuid4().hex[:8]}", f"out-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.kafka, [source, output], partitions=3)
    produce_all(settings.kafka, source, [(f"k-{i % 7}".encode(), f"v-{i}".encode()) for i in range(RECORDS)])
    group = f"commit-outcome-{source}"
    loop = TransactionalLoop(settings.kafka, group, [source], f"{group}-0", batch_size=BATCH)
    loop.producer = CommitAnswerLost(loop.producer, nth=2)
    stage = Background(lambda stop: loop.run(Copy(output), stop))
    try:
        copied = read_committed(settings.kafka, output, RECORDS, idle_s=3.0)
    finally:
        stage.stop()
    values = [m.value() for m in copied]
    assert loop.producer.commits >= 2 and loop.stats.aborted == 1, (loop.producer.commits, loop.stats.aborted)
    assert len(values) == len(set(values)) == RECORDS, (len(values), len(set(values)))
