"""`eddy produce`: synthetic transactions to the source topic, labels after a delay, paced or backfilled."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Producer

from streams.generator import Batch, TransactionGenerator, label_record
from streams.kafka import KafkaConfig

TICK_S = 0.01  # pacing granularity at a fixed --rate
LAST = 2**62   # "now" for labels that are due whatever their time


@dataclass
class ProduceReport:
    events: int = 0
    labels: int = 0
    frauds: int = 0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


class SyntheticProducer:
    """Drives a TransactionGenerator into Kafka with batched, idempotent produce calls."""

    def __init__(self, kafka: KafkaConfig, source_topic: str, labels_topic: str | None,
                 generator: TransactionGenerator, label_delay_ms: int = 0,
                 clock: Callable[[], float] = time.time, linger_ms: float = 20) -> None:
        # linger_ms: how long a record may wait to fill a batch; the default favours throughput,
        # a latency measurement uses ~1 ms (each record's Kafka timestamp is taken when it is queued).
        self.producer = Producer(kafka.client(**{
            "enable.idempotence": True, "linger.ms": linger_ms, "batch.num.messages": 10000,
            "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }))
        self.source, self.labels_topic = source_topic, labels_topic
        self.gen = generator
        self.label_delay_ms = label_delay_ms
        self.clock = clock
        self.pending: deque[tuple[int, str, bool]] = deque()  # (label time ms, event id, is fraud)
        self.report = ProduceReport()
        self.errors: list[str] = []

    def _on_delivery(self, err, _msg) -> None:
        if err is not None and len(self.errors) < 10:
            self.errors.append(str(err))

    def _send(self, topic: str, key: bytes, value: bytes) -> None:
        try:
            self.producer.produce(topic, value, key, on_delivery=self._on_delivery)
        except BufferError:
            self.producer.poll(0.05)
            self.producer.produce(topic, value, key, on_delivery=self._on_delivery)

    def _emit(self, batch: Batch) -> None:
        topic, send = self.source, self._send
        for key, value in zip(batch.keys, batch.values, strict=True):
            send(topic, key, value)
        self.producer.poll(0)
        self.report.events += len(batch.keys)
        self.report.frauds += int(batch.is_fraud.sum())
        if self.labels_topic is not None:
            delay = self.label_delay_ms
            self.pending.extend(zip((batch.event_time_ms + delay).tolist(), batch.event_ids, batch.is_fraud.tolist(),
                                    strict=True))

    def _emit_due_labels(self, now_ms: int) -> None:
        pending, send, topic = self.pending, self._send, self.labels_topic
        if topic is None:  # nothing is pending either: _emit queues labels only for a labels topic
            return
        while pending and pending[0][0] <= now_ms:
            label_time, event_id, is_fraud = pending.popleft()
            send(topic, event_id.encode(), label_record(event_id, is_fraud, label_time))
            self.report.labels += 1

    def run(self, count: int, rate: float | None, backfill: bool,
            on_progress: Callable[[ProduceReport], None] = lambda r: None, batch_size: int = 5000) -> ProduceReport:
        """Produce `count` events: at `rate` events/s with wall-clock event times, as fast as possible when
        rate is None, or (backfill) with the generator's historical times. Labels follow when due."""
        start = self.clock()
        done = 0
        while done < count:
            now = self.clock()
            if rate:
                due = int((now - start) * rate) + 1
                n = min(count, due) - done
                if n <= 0:
                    time.sleep(TICK_S)
                    continue
                if not backfill:
                    self.gen.set_clock(int(now * 1000), 1000.0 / rate)
            else:
                n = min(batch_size, count - done)
                if not backfill:  # the pace actually kept, so the fraud share stays as configured
                    self.gen.set_clock(int(now * 1000), max(0.001, 1000 * (now - start) / max(done, 1)))
            self._emit(self.gen.batch(n))
            done += n
            # A backfill is history: its labels are history too and go out at once (their label_time
            # still says when each was known); live labels wait for their time.
            self._emit_due_labels(LAST if backfill else int(self.clock() * 1000))
            on_progress(self.report)
        while self.pending:  # the last labels follow their events after the delay
            self._emit_due_labels(int(self.clock() * 1000))
            on_progress(self.report)
            if self.pending:
                time.sleep(min(0.2, max(0.0, self.pending[0][0] / 1000 - self.clock())))
        self.producer.flush(60)
        self.report.seconds = self.clock() - start
        on_progress(self.report)
        return self.report
