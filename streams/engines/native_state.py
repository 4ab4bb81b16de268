"""Entity state of the native engine: live objects in memory per source partition, written to a
compacted changelog topic a while after they change, restored from it plus a replay of the source.

An entity's changelog record holds its state and the source offset it is complete up to (every
event of the entity before that offset is in it, none after). Each batch writes, in its own
transaction, the entities that have been changed for longer than checkpoint_s (so the work is spread
over the batches, not a pause every checkpoint_s), and a marker per partition (the empty key): the
offset L of the oldest change not written yet. The batch's consumed offsets commit in the same
transaction, so the group's committed offset C is never behind L. Restoring a partition reads its
changelog, then replays the source records in [L, C) through the same front door and feature logic,
each to its entity only when past that entity's own offset, emitting nothing (those outputs were
committed): the state is then exactly what an uninterrupted run would hold at C."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from features.waiting import TimedOut, wait_until
from features.windows import EntityState
from streams.kafka import KafkaConfig, Record, consumed

log = logging.getLogger(__name__)
MARKER_KEY = b""  # never an entity key: the front door refuses an empty key


@dataclass
class PartitionState:
    """One source partition: entity key -> state (bytes until first needed: restoring parses nothing),
    the entities changed and not written yet (oldest change first, with its source offset), and when
    each batch's changes began."""

    entities: dict[bytes, EntityState | bytes] = field(default_factory=dict)
    dirty: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    changed_at: deque = field(default_factory=deque)  # (monotonic time, entities newly dirty), per batch
    next_offset: int | None = None   # the source offset after the last record processed
    marked: int | None = None        # the offset in the latest marker written
    as_of: dict[bytes, int] = field(default_factory=dict)  # while restoring: each entity's offset
    # keys whose latest changelog record the restore refused, not being one this module writes: "offset N: why"
    refused: dict[bytes, str] = field(default_factory=dict)
    rewrite: bool = False  # write every entity (and the refused keys' tombstones) in the next batch

    def replay_from(self) -> int | None:
        """The marker's offset: the oldest change not written yet, else the next offset."""
        return next(iter(self.dirty.values())) if self.dirty else self.next_offset


def marker_value(next_offset: int) -> bytes:
    """A partition marker's changelog value: the source offset a restore replays from."""
    return orjson.dumps({"next_offset": next_offset})


def entity_value(as_of: int, state: bytes) -> bytes:
    """A changelog record's value: the offset the state is complete up to, then the state."""
    return as_of.to_bytes(8, "big", signed=True) + state


def split_entity_value(value: bytes) -> tuple[int, bytes]:
    """entity_value's parts: the offset the state is complete up to, and the state bytes."""
    return int.from_bytes(value[:8], "big", signed=True), value[8:]


def refusal(key: bytes, value: bytes) -> str | None:
    """Why a changelog record with a value is not one this module writes (None when it is): a marker is
    JSON with a next_offset >= 0, an entity value an offset >= 0 and then a JSON array (the state is
    parsed for that alone, never unpickled; its layout is checked where it is first used)."""
    try:
        if key == MARKER_KEY:
            marker = orjson.loads(value)
            ok = isinstance(marker, dict) and type(marker.get("next_offset")) is int and marker["next_offset"] >= 0
            return None if ok else "a partition marker without a next_offset >= 0"
        if len(value) < 9 or split_entity_value(value)[0] < 0:
            return "an entity value without its offset"
        return None if isinstance(orjson.loads(value[8:]), list) else "an entity state that is not a JSON array"
    except orjson.JSONDecodeError as exc:
        return f"not JSON ({exc})"


@dataclass
class RestoreReport:
    """What restoring partitions has cost since the step started: changelog records read, source
    records replayed, seconds, and changelog keys refused."""

    changelog_records: int = 0
    replayed: int = 0
    seconds: float = 0.0
    refused: int = 0  # changelog keys whose latest record was not the engine's


# A restore read that gets nothing at all (no record, no partition end) for this long gives up: the
# stage exits and supervision starts it again, rather than hanging on a broker that stopped answering.
STALL_S = 60.0


class _Progress:
    """check(value) raises TimedOut once `value` (what a read has got so far) has not changed for STALL_S."""

    def __init__(self, what: str) -> None:
        self.what, self.since = what, time.monotonic()
        self.last: object = None

    def check(self, value: object) -> None:
        now = time.monotonic()
        if value != self.last:
            self.last, self.since = value, now
        elif now - self.since > STALL_S:
            raise TimedOut(f"{self.what}: nothing read for {STALL_S:.0f}s")


def _consumer(kafka: KafkaConfig, group: str) -> Consumer:
    # assign() only, never subscribe() or commit(): the group id names the client, no group forms
    return Consumer(kafka.client(**{
        "group.id": group, "enable.auto.commit": False, "isolation.level": "read_committed",
        "enable.partition.eof": True, "fetch.wait.max.ms": 10, "auto.offset.reset": "earliest",
    }))


def read_changelog(kafka: KafkaConfig, topic: str, partitions: Sequence[int],
                   timeout_s: float = 300.0) -> tuple[dict[int, PartitionState], dict[int, int], int]:
    """The committed changelog of `partitions`: their states, the marker offsets found, records read.
    TimedOut (a ServiceError) when reading it takes over `timeout_s`."""
    states = {p: PartitionState() for p in partitions}
    markers: dict[int, int] = {}
    consumer = _consumer(kafka, f"{topic}-restore")
    todo: set[int] = set()
    read = 0
    progress = _Progress(f"restoring from {topic}")

    def read_batch() -> bool:
        """One batch of records into states and markers; True once every partition was read to its end."""
        nonlocal read
        for m in consumed(consumer.consume(10_000, 0.5)):
            error = m.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    todo.discard(m.partition())
                    continue
                raise RuntimeError(f"reading {topic}[{m.partition()}]: {error}")
            read += 1
            key, value = m.key(), m.value()
            part = states[m.partition()]
            if key is None:  # not a record of this module's: every one it writes has a key
                part.refused[MARKER_KEY] = f"offset {m.offset()}: a record without a key"
                continue
            if value is not None and (why := refusal(key, value)) is not None:
                part.refused[key] = f"offset {m.offset()}: {why}"
                continue
            part.refused.pop(key, None)  # a later record of the engine's own supersedes a refused one
            if key == MARKER_KEY and value is not None:
                markers[m.partition()] = orjson.loads(value)["next_offset"]
            elif value is None:
                part.entities.pop(key, None)
                part.as_of.pop(key, None)
            else:
                part.as_of[key], part.entities[key] = split_entity_value(value)
        progress.check((read, len(todo)))
        return not todo

    try:
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            if high > low:
                todo.add(p)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        if todo:
            wait_until(read_batch, timeout_s, f"the end of {topic} partitions {sorted(todo)}", every_s=0)
    finally:
        consumer.close()
    return states, markers, read


def replay_source(kafka: KafkaConfig, topic: str, ranges: dict[int, tuple[int, int]],
                  apply: Callable[[list[Record]], None], group: str, timeout_s: float = 600.0) -> int:
    """Hand the committed source records of each partition p with offsets in ranges[p] = [start, end)
    to apply(batch), in offset order per partition; returns the records handed over. A start of
    OFFSET_BEGINNING is the partition's first retained record. `group` names the client (the stage's
    own, which its ACL allows: librdkafka asks for a group's coordinator even for assign() alone).
    TimedOut (a ServiceError) when the replay takes over `timeout_s`."""
    ranges = {p: r for p, r in ranges.items() if r[1] > max(r[0], 0)}
    if not ranges:
        return 0
    consumer = _consumer(kafka, group)
    todo = set(ranges)
    replayed = 0
    progress = _Progress(f"replaying {topic}")

    def replay_batch() -> bool:
        """One batch of records in range to apply(); True once every partition reached its range's end."""
        nonlocal replayed
        batch = []
        for m in consumed(consumer.consume(5_000, 0.5)):
            error = m.error()
            p = m.partition()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    todo.discard(p)
                    continue
                raise RuntimeError(f"replaying {topic}[{p}]: {error}")
            if p not in todo:
                continue
            if m.offset() < ranges[p][1]:
                batch.append(m)
            if m.offset() >= ranges[p][1] - 1:
                todo.discard(p)
                consumer.pause([TopicPartition(topic, p)])
        if batch:
            apply(batch)
            replayed += len(batch)
        progress.check((replayed, len(todo)))
        return not todo

    try:
        consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in ranges.items()])
        wait_until(replay_batch, timeout_s, f"the replay of {topic} partitions {sorted(todo)}", every_s=0)
    finally:
        consumer.close()
    return replayed
