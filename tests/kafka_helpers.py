"""Small helpers for integration tests that read and write a real broker."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, Producer

from features.waiting import poll
from streams.kafka import KafkaConfig


def produce_all(kafka: KafkaConfig, topic: str, records: list[tuple], headers=None) -> list:
    """Produce (key, value) or (key, value, Kafka timestamp ms) records in order; returns the delivered
    messages (with partition and offset)."""
    delivered: list = [None] * len(records)
    producer = Producer(kafka.client(**{"enable.idempotence": True, "linger.ms": 1}))

    def report(index: int):
        def cb(err, msg):
            assert err is None, err
            delivered[index] = msg
        return cb

    for i, (key, value, *stamp) in enumerate(records):
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report(i),
                         timestamp=stamp[0] if stamp else 0)
    assert producer.flush(30) == 0
    return delivered


def read_committed(kafka: KafkaConfig, topic: str, count: int, timeout_s: float = 60.0, idle_s: float = 0.0) -> list:
    """Read `count` records of `topic` from the beginning as a read_committed consumer; after reaching
    count, keep reading `idle_s` more seconds so that extra (duplicate) records would show too."""
    consumer = Consumer(kafka.client(**{
        "group.id": f"test-reader-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": "read_committed"}))
    consumer.subscribe([topic])
    out: list = []
    reached_at: float | None = None  # when out first held count records

    def done() -> bool:
        nonlocal reached_at
        out.extend(msg for msg in consumer.consume(1000, 0.2) if msg.error() is None)
        if len(out) >= count:
            reached_at = reached_at or time.monotonic()
            return time.monotonic() - reached_at >= idle_s
        return False

    try:
        poll(done, timeout_s, every_s=0)  # on timeout the caller sees the records that came
    finally:
        consumer.close()
    return out


class Background:
    """Run fn(should_stop) in a thread; stop() sets the flag and joins, re-raising what the thread raised."""

    def __init__(self, fn: Callable[[Callable[[], bool]], None]) -> None:
        self._stop = threading.Event()
        self._error: BaseException | None = None

        def target() -> None:
            try:
                fn(self._stop.is_set)
            except BaseException as exc:  # noqa: BLE001 - re-raised in stop()
                self._error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self.thread.join(timeout_s)
        if self._error is not None:
            raise self._error


def count_committed(kafka: KafkaConfig, topic: str, idle_s: float = 2.0, timeout_s: float = 120.0) -> int:
    """How many committed records the topic holds now: read until nothing new comes for idle_s."""
    from streams.kafka import read_topic

    return len(read_topic(kafka, topic, quiet_s=idle_s, timeout_s=timeout_s))
