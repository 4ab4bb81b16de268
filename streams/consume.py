"""`eddy consume`: print a topic's records, as text or one JSON object per line."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable

import orjson
from confluent_kafka import Consumer, KafkaError, Message

from features.errors import ConfigError
from features.waiting import poll
from streams.kafka import KafkaConfig


def _decode(raw: bytes | None):
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def format_record(msg, as_json: bool) -> str:
    if as_json:
        return orjson.dumps({
            "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
            "timestamp": msg.timestamp()[1], "key": msg.key().decode("utf-8", "replace") if msg.key() else None,
            "value": _decode(msg.value()),
            "headers": {k: v.decode("utf-8", "replace") if v else None for k, v in (msg.headers() or [])},
        }).decode()
    key = msg.key().decode("utf-8", "replace") if msg.key() else "-"
    value = msg.value().decode("utf-8", "replace") if msg.value() is not None else "null"
    return f"{msg.partition()}:{msg.offset()}\t{key}\t{value}"


def print_records(kafka: KafkaConfig, topic: str, *, from_beginning: bool, count: int | None, as_json: bool,
                  idle_timeout_s: float | None, write: Callable[[str], None]) -> int:
    """Print records until `count` or `idle_timeout_s` without one; returns how many were printed."""
    consumer = Consumer(kafka.client(**{
        "group.id": f"eddy-consume-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        "auto.offset.reset": "earliest" if from_beginning else "latest", "isolation.level": "read_committed"}))
    if topic not in consumer.list_topics(timeout=10).topics:
        consumer.close()
        raise ConfigError(f"topic {topic!r} does not exist: `eddy up` creates the spec's topics")
    consumer.subscribe([topic])
    printed = 0

    def next_batch() -> list[Message]:
        """What one consume returns (nothing when no record came within 0.5 s)."""
        return consumer.consume(min(500, (count - printed) if count else 500), 0.5)

    idle_s = math.inf if idle_timeout_s is None else idle_timeout_s  # None: wait for records for ever
    try:
        while count is None or printed < count:
            msgs = poll(next_batch, idle_s, every_s=0)
            if not msgs:  # none came for idle_timeout_s
                break
            for msg in msgs:
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise ConfigError(f"reading {topic!r} failed: {error.str()}")
                    continue
                write(format_record(msg, as_json))
                printed += 1
    finally:
        consumer.close()
    return printed
