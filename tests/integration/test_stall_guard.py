"""The stalled-consumer check on a real broker: what StallGuard counts as records left to read. A
consumer that has read everything (the last transaction committed, or aborted) is not behind; one
assigned records it has not read is, at its position."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from streams.guards import StallGuard

pytestmark = pytest.mark.kafka


def _transaction(settings, topic: str, partition: int, values: list[bytes], commit: bool) -> None:
    producer = Producer(settings.kafka.client(**{"transactional.id": f"test-stall-{uuid.uuid4().hex[:8]}"}))
    producer.init_transactions(30)
    producer.begin_transaction()
    for value in values:
        producer.produce(topic, value, partition=partition)
    producer.flush(30)
    (producer.commit_transaction if commit else producer.abort_transaction)(30)


def _reader(settings, topic: str) -> Consumer:
    consumer = Consumer(settings.kafka.client(**{
        "group.id": f"test-stall-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": "read_committed"}))
    consumer.subscribe([topic])
    return consumer


def _drain(consumer: Consumer, expect: int, timeout_s: float = 30.0) -> int:
    """Consume until `expect` records came (or timeout_s), then 2 s more for any extra; the number read."""
    read, deadline = 0, time.monotonic() + timeout_s
    while read < expect and time.monotonic() < deadline:
        read += sum(m.error() is None for m in consumer.consume(500, 0.5))
    quiet_until = time.monotonic() + 2.0
    while time.monotonic() < quiet_until:
        read += sum(m.error() is None for m in consumer.consume(500, 0.5))
    return read


def test_a_consumer_that_read_everything_is_not_behind_after_a_commit_or_an_abort(settings, fresh_topic):
    _transaction(settings, fresh_topic, 0, [b"a", b"b", b"c"], commit=True)
    _transaction(settings, fresh_topic, 1, [b"d", b"e"], commit=True)
    _transaction(settings, fresh_topic, 1, [b"aborted-1", b"aborted-2"], commit=False)  # the partition ends aborted
    consumer = _reader(settings, fresh_topic)
    try:
        assert _drain(consumer, 5) == 5
        assert StallGuard(consumer).behind() == {}
    finally:
        consumer.close()


def test_records_not_read_yet_are_behind_at_the_consumer_position(settings, fresh_topic):
    _transaction(settings, fresh_topic, 2, [b"x"] * 10, commit=True)
    consumer = Consumer(settings.kafka.client(**{
        "group.id": f"test-stall-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        "isolation.level": "read_committed"}))
    try:
        consumer.assign([TopicPartition(fresh_topic, 2, OFFSET_BEGINNING)])
        guard = StallGuard(consumer)
        [(partition, position)] = guard.behind().items()  # assigned, nothing read yet: no position
        assert partition == (fresh_topic, 2) and position < 0
        read = 0
        while read < 4:
            read += len(consumer.consume(4 - read, 1.0))
        assert guard.behind() == {(fresh_topic, 2): 4}
        assert _drain(consumer, 6) == 6
        assert guard.behind() == {}
    finally:
        consumer.close()
