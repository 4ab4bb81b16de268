"""The online writer: feature rows from the features topic into Feast's online store (Redis).

One write per batch (streams.feast_redis: Feast's layout, pipelined), holding each entity's newest
non-late row of the batch; offsets are committed after the write. That is at-least-once, which is
enough: a write is an overwrite, and a row whose event time is not newer than the stored one is
skipped, as Feast skips it, so a replayed or out-of-order row never replaces a newer one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException

from features.feast_repo import feature_dtypes, feature_store, view_name
from features.spec import PipelineSpec
from features.waiting import poll
from streams.guards import StallGuard
from streams.kafka import KafkaConfig, partitions_text
from streams.metrics import Heartbeat
from streams.stores import redis_client
from streams.telemetry import StageMetrics

log = logging.getLogger(__name__)

COMPONENT = "online-writer"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_BAD_ROW = (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError)


def group_id(spec: PipelineSpec) -> str:
    """The writer's consumer group (and the name in its logs and metrics)."""
    return spec.stage_id(COMPONENT)


@dataclass
class WriterStats:
    """What the writer has done since it started (each field says what it counts), for its heartbeat."""

    events: int = 0       # records consumed
    rows: int = 0         # rows handed to Feast (each entity's newest of its batch)
    batches: int = 0      # Feast writes
    late: int = 0         # rows marked late, skipped
    superseded: int = 0   # rows with a newer row of the same entity in their batch
    bad: int = 0          # records that are not a feature row, skipped and logged
    retries: int = 0      # failed writes (Redis unreachable) retried


@dataclass
class LatestRows:
    """Each entity's newest non-late row of one batch, in first-seen order."""

    keys: list[str]
    event_ms: list[int]
    features: list[dict[str, Any]]


def latest_rows(spec: PipelineSpec, messages: Sequence, stats: WriterStats) -> LatestRows:
    """The per-record loop: parse, drop late and bad rows, keep the newest row per entity (newest())."""
    key_field = spec.key
    timely = []
    for msg in messages:
        try:
            row = orjson.loads(msg.value())
            if row.get("late"):
                stats.late += 1
                continue
            key, t, features = row[key_field], _epoch_ms(row["event_time"]), row["features"]
            if not isinstance(key, str) or not isinstance(features, dict):
                raise TypeError(f"{key_field} must be a string and features an object")
        except _BAD_ROW as exc:
            stats.bad += 1
            log.warning("skipped a record that is not a feature row at %s[%s]@%s: %s",
                        msg.topic(), msg.partition(), msg.offset(), exc)
            continue
        timely.append((key, t, features))
    return newest(timely, stats)


def newest(rows: Iterable[tuple[str, int, dict[str, Any]]], stats: WriterStats) -> LatestRows:
    """Each entity's newest of timely (key, event time ms, features) rows in their order, in first-seen order
    (of equal times the later row, which saw more events)."""
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    for key, t, features in rows:
        previous = latest.get(key)
        if previous is not None:
            stats.superseded += 1
            if t < previous[0]:
                continue
        latest[key] = (t, features)
    return LatestRows(list(latest), [v[0] for v in latest.values()], [v[1] for v in latest.values()])


def _epoch_ms(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return (datetime.fromisoformat(value) - _EPOCH) // _MS


def write_latest(spec: PipelineSpec, rows_writer, rows: LatestRows, stats: WriterStats) -> int:
    """One pipelined write of a batch's latest rows (a row whose values do not fit their columns is
    skipped and counted as bad); returns the rows written. Redis errors propagate to the caller, which
    retries (the online writer) or redoes the batch (the fused stage)."""
    if not rows.keys:
        return 0
    try:
        written = rows_writer.write(rows.keys, rows.event_ms, rows.features)
    except (TypeError, ValueError):
        rows = fitting(spec, rows, stats)
        written = rows_writer.write(rows.keys, rows.event_ms, rows.features)
    stats.rows += written
    stats.batches += 1
    return written


def fitting(spec: PipelineSpec, rows: LatestRows, stats: WriterStats) -> LatestRows:
    """The rows whose values fit their columns; the others (a null count, a string) are skipped."""
    dtypes = feature_dtypes(spec)
    good = []
    for i, features in enumerate(rows.features):
        if all(_fits(features.get(name), kind) for name, kind in dtypes.items()):
            good.append(i)
        else:
            stats.bad += 1
            log.warning("skipped the row of %s %r: its features %s do not fit %s", spec.key, rows.keys[i],
                        features, dtypes)
    return LatestRows([rows.keys[i] for i in good], [rows.event_ms[i] for i in good],
                      [rows.features[i] for i in good])


class OnlineWriter:
    """Consumes the features topic as group `eddy-<pipeline>-online-writer` and writes each batch
    with `rows_writer.write(entity_ids, event_ms, feature_dicts)` (a FeastRedisWriter)."""

    def __init__(self, kafka: KafkaConfig, spec: PipelineSpec, rows_writer, heartbeat: Heartbeat | None = None,
                 batch_size: int = 5000, batch_wait_s: float = 0.1) -> None:
        self.spec, self.rows_writer, self.heartbeat = spec, rows_writer, heartbeat
        self.batch_size, self.batch_wait_s = batch_size, batch_wait_s
        self.view = view_name(spec)
        self.consumer = Consumer(kafka.client(**{
            "group.id": group_id(spec),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            # the online store is fresh within ~0.1 s: fetch whole batches, at most 10 a second
            "fetch.wait.max.ms": 100,
            "fetch.min.bytes": 1_048_576,
        }))
        self.stats = WriterStats()
        self._committed: dict[tuple[str, int], int] = {}
        self.metrics: StageMetrics | None = None
        self._stalls = StallGuard(self.consumer)

    def run(self, should_stop: Callable[[], bool]) -> WriterStats:
        """Write until should_stop() is true; then close the consumer (uncommitted records replay)."""
        self.consumer.subscribe(
            [self.spec.topics.features],
            on_assign=lambda _c, tps: log.info("partitions assigned: %s", partitions_text(tps)),
            on_revoke=lambda _c, tps: log.info("partitions revoked: %s", partitions_text(tps)))
        self._beat(force=True)
        try:
            while not should_stop():
                messages = self.consumer.consume(self.batch_size, self.batch_wait_s)
                batch = []
                for m in messages:
                    error = m.error()
                    if error is None:
                        batch.append(m)
                    elif error.code() != KafkaError._PARTITION_EOF:
                        log.warning("consume error: %s", error)
                if batch:
                    started = time.perf_counter()
                    if self.write(batch, should_stop):
                        self._commit()
                        if self.metrics is not None:
                            self.metrics.consumed(batch)
                            self.metrics.batch(len(batch), time.perf_counter() - started)
                            self.metrics.latencies(time.time() * 1000, [m.timestamp()[1] for m in batch])
                elif not messages:
                    self._commit()  # idle: the position may have moved past transaction markers
                    self._stalls.idle()
                self._beat()
        finally:
            self._beat(force=True)
            self.consumer.close()
        return self.stats

    def write(self, messages: Sequence, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Write one batch with one pipelined write, retried while Redis is away; False if stopped
        before the write succeeded."""
        from redis.exceptions import RedisError

        rows = latest_rows(self.spec, messages, self.stats)
        self.stats.events += len(messages)
        delay = 0.2
        while True:
            try:
                write_latest(self.spec, self.rows_writer, rows, self.stats)
                return True
            except RedisError as exc:
                self.stats.retries += 1
                log.warning("online store write failed (%s); retrying in %.1fs", exc, delay)
                if _sleep_unless(should_stop, delay):
                    return False
                delay = min(delay * 2, 5.0)

    def _commit(self) -> None:
        """Commit the consumer's positions when they moved: everything consumed is written by now.
        Positions rather than last offset + 1, so transaction markers after a batch count as
        consumed too and the group's lag reaches 0."""
        try:
            moved = [tp for tp in self.consumer.position(self.consumer.assignment())
                     if tp.offset >= 0 and self._committed.get((tp.topic, tp.partition)) != tp.offset]
            if moved:
                self.consumer.commit(offsets=moved, asynchronous=False)
                self._committed.update(((tp.topic, tp.partition), tp.offset) for tp in moved)
        except KafkaException as exc:
            # A rebalance took the partitions: their new owner rewrites from the last commit.
            log.warning("offset commit failed, the records will be written again: %s", exc.args[0])

    def _beat(self, force: bool = False) -> None:
        if self.metrics is not None:
            m = self.metrics
            m.total(m.state_writes, self.stats.rows)
            m.total(m.late, self.stats.late)
            m.total(m.redis_errors, self.stats.retries)
        if self.heartbeat is not None:
            s = self.stats
            self.heartbeat.beat(s.events, force=force, rows=s.rows, batches=s.batches, late=s.late,
                                bad=s.bad, retries=s.retries)


def _fits(value: Any, kind: str) -> bool:
    if kind == "Int64":
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _sleep_unless(should_stop: Callable[[], bool], seconds: float) -> bool:
    """Sleep up to `seconds`; True if should_stop() became true meanwhile."""
    return bool(poll(should_stop, seconds, every_s=0.05))


def run_online_writer(kafka: KafkaConfig, spec: PipelineSpec, redis_url: str, repo_dir: Path,
                      should_stop: Callable[[], bool], *, project: str | None = None,
                      batch_size: int = 5000, batch_wait_s: float = 0.1,
                      metrics: StageMetrics | None = None) -> WriterStats:
    """Set up the Feast repo under repo_dir (idempotent), then write until should_stop() (with
    `metrics`, its counts exported as it goes)."""
    from streams.feast_redis import FeastRedisWriter

    store = feature_store(spec, repo_dir, redis_url, project=project)
    client = redis_client(redis_url)
    rows_writer = FeastRedisWriter(store, view_name(spec), spec.key, feature_dtypes(spec), client)
    heartbeat = Heartbeat(client, spec.name, COMPONENT)
    writer = OnlineWriter(kafka, spec, rows_writer, heartbeat, batch_size=batch_size, batch_wait_s=batch_wait_s)
    writer.metrics = metrics
    log.info("online writer: %s -> Feast view %r (project %r)", spec.topics.features, writer.view,
             store.project)
    return writer.run(should_stop)
