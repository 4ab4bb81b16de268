"""The Python that runs inside the Flink job: the keyed function that validates, dedupes and featurizes each
record with the same Validator and Featurizer as the Faust engine, and its heartbeat."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

from pyflink.common import Row, Types
from pyflink.common.time import Time
from pyflink.datastream import KeyedProcessFunction, OutputTag, RuntimeContext
from pyflink.datastream.state import MapStateDescriptor, StateTtlConfig, ValueStateDescriptor

from features.apply import Refused
from features.spec import PipelineSpec
from features.validation import Invalid
from streams.dedupe import DEFAULT_RETENTION_MS
from streams.dlq import dead_letter
from streams.engines.config import STAGE
from streams.telemetry import refusal_reason

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
HEADERS = Types.MAP(Types.STRING(), BYTES)
# A source record as the keyed function receives it; the names are the source table's columns.
SOURCE_ROW = Types.ROW_NAMED(["k", "v", "topic", "partition", "offset", "headers", "arrival"],
                             [BYTES, BYTES, Types.STRING(), Types.INT(), Types.LONG(), HEADERS, Types.LONG()])
K, V, TOPIC, PARTITION, OFFSET, HEADERS_FIELD, ARRIVAL = range(7)
# What the features sink and the DLQ sink are given; the names are the sink tables' columns.
FEATURE_ROW = Types.ROW_NAMED(["k", "v"], [BYTES, BYTES])
DLQ_ROW = Types.ROW_NAMED(["k", "v", "headers"], [BYTES, BYTES, HEADERS])
DLQ_TAG = OutputTag("dlq", DLQ_ROW)
HEARTBEAT_MS = 1_000


class _RowMessage:
    """A source row seen through the confluent-kafka Message methods dead_letter() reads."""

    __slots__ = ("_r",)

    def __init__(self, row: Row) -> None:
        self._r = row

    def key(self) -> bytes | None:
        return self._r[K]

    def value(self) -> bytes | None:
        return self._r[V]

    def topic(self) -> str:
        return self._r[TOPIC]

    def partition(self) -> int:
        return self._r[PARTITION]

    def offset(self) -> int:
        return self._r[OFFSET]

    def headers(self) -> list[tuple[str, bytes]]:
        return list((self._r[HEADERS_FIELD] or {}).items())

    def timestamp(self) -> tuple[int, int]:
        ms = self._r[ARRIVAL]
        return (0, -1) if ms is None else (1, ms)


class _Reporter:
    """The stage's heartbeat with the function's counts. Featurize beats on a processing-time timer from the
    task thread: a Python thread of its own would not run in thread mode while the task waits in Java."""

    def __init__(self, redis_url: str, pipeline: str, counts: dict[str, int], pid: int, replica: str) -> None:
        import redis

        from streams.metrics import Heartbeat

        self._heartbeat = Heartbeat(redis.Redis.from_url(redis_url), pipeline, STAGE)
        self._heartbeat.field = replica
        self._counts, self._pid = counts, pid

    def beat(self, force: bool = False) -> None:
        """At most once a second unless forced: each of the subtask's tick keys has a timer that calls it."""
        c = self._counts
        self._heartbeat.beat(c["valid"] + c["dlq"] + c["duplicates"], force=force, engine="flink", pid=self._pid, **c)


class Featurize(KeyedProcessFunction):
    """Per record, keyed by the entity key read from it: invalid -> the DLQ side output; an id already
    seen for this entity -> counted and dropped; otherwise the shared apply step over the entity's state
    bytes -> the features row, or the DLQ side output when the step refuses the event.

    Seen ids are kept per entity (MapState, expiring after retention_ms): a resent record names the same
    entity, so it reaches the same key. Both states are restored with the source offsets from one
    checkpoint, so a replay after a failure is never mistaken for a duplicate."""

    def __init__(self, spec: PipelineSpec, redis_url: str | None, owner_pid: int | None = None,
                 retention_ms: int = DEFAULT_RETENTION_MS) -> None:
        """owner_pid: the process the heartbeat names (locally the one that runs the job, which is what
        `eddy up` watches); by default the process this function runs in."""
        self.spec, self.redis_url, self.retention_ms = spec, redis_url, retention_ms
        self.owner_pid = owner_pid

    def open(self, runtime_context: RuntimeContext) -> None:
        """Called by Flink once per subtask before its first element: builds the validator and the
        apply step, binds the keyed states (entity state, seen ids) and the heartbeat reporter."""
        from features.validation import Validator
        from streams.featurize import Featurizer

        self.parse = Validator(self.spec).parse
        self.apply = Featurizer(self.spec).apply_bytes
        self.dlq_topic = self.spec.topics.dlq
        # The entity state's bytes kept as a STRING (latin-1: one char per byte), never pickled: BYTES comes
        # back as a tuple of ints in thread mode and fails on None, and a pickle would be run on restore.
        self.state = runtime_context.get_state(ValueStateDescriptor("entity-state", Types.STRING()))
        seen = MapStateDescriptor("seen-ids", Types.STRING(), Types.BOOLEAN())
        # Cleanup named explicitly: PyFlink's default (background) cleanup builds a RocksDB filter setting
        # through a JVM gateway, which in thread mode starts a second JVM from inside the task.
        seen.enable_time_to_live(StateTtlConfig.new_builder(Time.milliseconds(self.retention_ms))
                                 .disable_cleanup_in_background().cleanup_incrementally(10, False)
                                 .cleanup_full_snapshot().build())
        self.seen = runtime_context.get_map_state(seen)
        self.counts = {"valid": 0, "dlq": 0, "duplicates": 0}
        self.reporter = None
        if self.redis_url:
            pid = self.owner_pid or os.getpid()
            replica = f"{socket.gethostname()}:{pid}"
            if self.owner_pid is None:  # subtasks may share a TaskManager's process (and the subtask
                replica += f"/{uuid.uuid4().hex[:8]}"  # index is out of reach in thread mode on Flink 2)
            self.reporter = _Reporter(self.redis_url, self.spec.name, self.counts, pid, replica)

    def close(self) -> None:
        """Called by Flink when the subtask ends: one last heartbeat, so status shows the final counts."""
        if self.reporter is not None:
            self.reporter.beat(force=True)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext) -> Iterator:
        """The heartbeat, about once a second; the timer is state, so a restored job keeps beating."""
        if self.reporter is not None:
            self.reporter.beat()
        timers = ctx.timer_service()  # after a long stop the restored timer is late: no catching up
        timers.register_processing_time_timer(max(timestamp, timers.current_processing_time()) + HEARTBEAT_MS)
        yield from ()

    def process_element(self, row: Row, ctx: KeyedProcessFunction.Context) -> Iterator:
        """One source row: an invalid record, an ambiguous key or an event the apply step refuses goes to
        the DLQ side output, a seen id is dropped, and any other event updates its entity's state and
        yields its features record (key, value)."""
        if row[TOPIC] is None:  # a tick flink_job adds at the start: it starts a heartbeat timer
            timers = ctx.timer_service()
            timers.register_processing_time_timer(timers.current_processing_time())
            return
        event = self.parse(row[V])
        if isinstance(event, Invalid):
            yield DLQ_TAG, self._dead_letter(row, event)
            return
        if event.key != ctx.get_current_key():  # the JSON names the key field twice, differently
            yield DLQ_TAG, self._dead_letter(row, f"field {self.spec.key!r} is ambiguous")
            return
        if self.seen.contains(event.event_id):
            self.counts["duplicates"] += 1
            return
        stored = self.state.value()
        new_state, value = self.apply(None if stored is None else stored.encode("latin-1"), event, row[ARRIVAL])
        self.seen.put(event.event_id, True)  # seen, as the other engines' front door has it, refused or not
        if isinstance(value, Refused):  # the shared apply step's refusal: the record's fault, not a stop
            yield DLQ_TAG, self._dead_letter(row, value)
            return
        if new_state is not None:
            self.state.update(new_state.decode("latin-1"))
        self.counts["valid"] += 1
        yield Row(event.key.encode(), value)

    def _dead_letter(self, row: Row, reason: str) -> Row:
        self.counts["dlq"] += 1
        by_reason = f"refused_{refusal_reason(reason)}"  # the job's process exports these (deploy.components)
        self.counts[by_reason] = self.counts.get(by_reason, 0) + 1
        letter = dead_letter(self.dlq_topic, _RowMessage(row), reason, STAGE)
        return Row(letter.key, letter.value, dict(letter.headers))
