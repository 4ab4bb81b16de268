"""What the bench's measurements share: readers that time records by their Kafka timestamps, the
backlog and fixed-load producers, percentiles, and waiting until the stack has caught up."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

import orjson
from confluent_kafka import Consumer, Producer

from deploy.settings import Settings
from features.spec import PipelineSpec
from features.waiting import poll
from streams.generator import GeneratorConfig, TransactionGenerator
from streams.kafka import KafkaConfig, ensure_topics

WARM_UP_TOPIC = "eddy-bench-warm-up"
LOAD_LINGER_MS = 5  # the fixed-load producer batches for up to 5 ms (librdkafka's default linger)


def reader(kafka: KafkaConfig, topics: list[str], from_end: bool = False, **extra) -> Consumer:
    """A read_committed reader of `topics` from their beginning, or (from_end) from their ends now."""
    from confluent_kafka import TopicPartition

    consumer = Consumer(kafka.client(**{"group.id": f"bench-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
                                        "enable.auto.commit": False, "isolation.level": "read_committed",
                                        "fetch.wait.max.ms": 100, **extra}))
    if not from_end:
        consumer.subscribe(topics)
        return consumer
    ends = []
    for topic in topics:
        for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
            ends.append(TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]))
    consumer.assign(ends)
    return consumer


def fill_backlog(kafka: KafkaConfig, topic: str, count: int, seed: int, start_ms: int, span_ms: int) -> None:
    gen = TransactionGenerator(GeneratorConfig(seed=seed, start_ms=start_ms, mean_gap_ms=span_ms / count,
                                               id_prefix=f"b{seed}"))
    producer = Producer(kafka.client(**{"linger.ms": 20, "batch.num.messages": 10000, "compression.type": "lz4",
                                        "queue.buffering.max.messages": 1_000_000, "enable.idempotence": True}))
    done = 0
    while done < count:
        batch = gen.batch(min(10_000, count - done))
        for key, value in zip(batch.keys, batch.values, strict=True):
            producer.produce(topic, value, key)
        producer.poll(0)
        done += len(batch.keys)
    producer.flush(60)


def timestamps(kafka: KafkaConfig, topic: str, want: set[str] | None, count: int, timeout_s: float,
                received: dict[str, float] | None = None,
                done: Callable[[dict[str, int]], bool] = lambda found: False,
                consumer: Consumer | None = None, values: dict[str, bytes] | None = None) -> dict[str, int]:
    """event_id -> Kafka timestamp (ms) of the records of `topic`, until `count` are seen or done(found)
    (what was seen when `timeout_s` pass); when given, `received` gets the wall-clock ms at which each
    record reached this read_committed reader (`consumer`: one placed already, else a reader from the
    topic's beginning), and `values` each record's value."""
    reading = consumer or reader(kafka, [topic])
    out: dict[str, int] = {}

    def complete() -> bool:
        """True once enough is seen; else reads what has arrived now, or waits for one record (so
        received times are not held back until a batch fills)."""
        if len(out) >= count or done(out):
            return True
        for m in reading.consume(5000, 0) or reading.consume(1, 0.2):
            value = m.value()
            if m.error() is None and value is not None:
                event_id = orjson.loads(value)["event_id"]
                if want is None or event_id in want:
                    out[event_id] = m.timestamp()[1]
                    if received is not None:
                        received[event_id] = time.time() * 1000
                    if values is not None:
                        values[event_id] = value
        return False

    try:
        poll(complete, timeout_s, every_s=0)
    finally:
        reading.close()
    return out


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {"p50": None, "p95": None, "p99": None, "count": 0}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 1), "p95": round(float(np.percentile(arr, 95)), 1),
            "p99": round(float(np.percentile(arr, 99)), 1), "count": len(values)}


def settle(settings: Settings, timeout_s: float = 180.0, but: str | None = None) -> float:
    """Wait until every consumer group of the stack (but a group ending in `but`) has caught up, so
    one measurement does not pay for the backlog of the one before; returns the seconds waited."""
    from streams.kafka import group_lag

    def caught_up() -> bool:
        lags = group_lag(settings.kafka, timeout_s=5)
        return all(n == 0 for group, topics in lags.items() if not (but and group.endswith(but))
                   for n in topics.values())

    started = time.monotonic()
    poll(caught_up, timeout_s, every_s=0.5)
    return time.monotonic() - started


def load_producer(settings: Settings, spec: PipelineSpec, gen: TransactionGenerator):
    """The fixed-load producer, connected and holding its idempotent producer id before the first
    measured record: a new client's first records otherwise wait for that, and count as latency."""
    from streams.producer import SyntheticProducer

    producer = SyntheticProducer(settings.kafka, spec.topics.source, None, gen, linger_ms=LOAD_LINGER_MS)
    ensure_topics(settings.kafka, [WARM_UP_TOPIC], 1)
    producer.producer.produce(WARM_UP_TOPIC, b"warm-up")
    producer.producer.flush(30)
    return producer
