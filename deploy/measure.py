"""What the bench's measurements share: readers that time records by their Kafka timestamps, the
backlog and fixed-load producers, percentiles, and waiting until the stack has caught up."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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


def _backlog_generator(count: int, seed: int, start_ms: int, span_ms: int) -> TransactionGenerator:
    return TransactionGenerator(GeneratorConfig(seed=seed, start_ms=start_ms, mean_gap_ms=span_ms / count,
                                                id_prefix=f"b{seed}"))


def backlog_start(count: int, seed: int, end_ms: int, span_ms: int) -> int:
    """The start_ms at which fill_backlog's `count` events (seed, span_ms) have their last event time at
    end_ms: the gaps are random (2,000 events over 2 h end minutes past start + span), and the times shift
    with the start."""
    start_ms = end_ms - span_ms
    gen, last, done = _backlog_generator(count, seed, start_ms, span_ms), start_ms, 0
    while done < count:
        batch = gen.batch(min(10_000, count - done))
        last, done = max(last, int(batch.event_time_ms.max())), done + len(batch.keys)
    return start_ms - (last - end_ms)


def fill_backlog(kafka: KafkaConfig, topic: str, count: int, seed: int, start_ms: int, span_ms: int) -> None:
    gen = _backlog_generator(count, seed, start_ms, span_ms)
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


def load_producer(settings: Settings, spec: PipelineSpec, gen: TransactionGenerator, topic: str | None = None):
    """The fixed-load producer (to `topic`, else the spec's source), connected and holding its idempotent
    producer id before the first measured record: a new client's first records otherwise wait for that,
    and count as latency."""
    from streams.producer import SyntheticProducer

    producer = SyntheticProducer(settings.kafka, topic or spec.topics.source, None, gen, linger_ms=LOAD_LINGER_MS)
    ensure_topics(settings.kafka, [WARM_UP_TOPIC], 1)
    producer.producer.produce(WARM_UP_TOPIC, b"warm-up")
    producer.producer.flush(30)
    return producer


@dataclass
class TimedLoad:
    """A fixed load's events as one output topic showed them, by event id: the source record's Kafka
    timestamp, the output record's, the wall-clock ms a read_committed reader received it, its value."""

    count: int
    sources: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)
    values: dict[str, bytes] = field(default_factory=dict)

    def latency_ms(self) -> list[float]:
        """Output record's Kafka timestamp - source record's, per event seen."""
        return [self.outputs[k] - t for k, t in self.sources.items() if k in self.outputs]

    def visible_ms(self) -> list[float]:
        """When the output became visible to the reader (wall clock) - source record's Kafka timestamp."""
        return [self.received[k] - t for k, t in self.sources.items() if k in self.received]


def timed_load(settings: Settings, spec: PipelineSpec, output: str, rate: int, seconds: float,
               source: str | None = None) -> TimedLoad:
    """Produce rate * seconds fresh events (new ids, wall-clock event times) at `rate` to `source` (else
    the spec's), reading `output` from its end meanwhile, so each record's arrival time is when it became
    visible to a read_committed reader."""
    count = int(rate * seconds)
    now_ms = int(time.time() * 1000)
    prefix = f"L{rate}-{now_ms}"  # the generator's ids are "<prefix>-<n>", n from 1
    gen = TransactionGenerator(GeneratorConfig(seed=rate, start_ms=now_ms, id_prefix=prefix,
                                               cards=max(10_000, rate * 20)))
    want = {f"{prefix}-{n}" for n in range(1, count + 1)}
    topic = source or spec.topics.source
    load = TimedLoad(count)
    # both placed at the topics' ends before the load starts: they see only its records, as they commit
    at_output = reader(settings.kafka, [output], from_end=True)
    at_source = reader(settings.kafka, [topic], from_end=True)
    watcher = threading.Thread(target=lambda: load.outputs.update(timestamps(
        settings.kafka, output, want, count, timeout_s=seconds + 120, received=load.received,
        consumer=at_output, values=load.values)))
    watcher.start()
    load_producer(settings, spec, gen, topic).run(count, float(rate), backfill=False)
    load.sources.update(timestamps(settings.kafka, topic, want, count, timeout_s=30, consumer=at_source))
    watcher.join()
    return load
