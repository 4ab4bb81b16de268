"""The native feature engine: the shared front door and feature logic on confluent-kafka's
transactional loop, with no stream framework in between.

Each batch is one Kafka transaction holding its features records, its dead letters, the entity
states due to be written (native_state: each changed entity about checkpoint_s after its change,
with an offset marker per partition) and the source offsets, so a killed worker loses and doubles
nothing. Entity state lives in memory as live objects; a partition the group assigns is restored
from its changelog and a replay of the source since the marker, before any of its records is
processed."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter as Tally
from collections.abc import Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from features.apply import Refused
from features.spec import PipelineSpec
from features.validation import Event
from features.windows import EntityState, FeatureRow
from streams.dedupe import Deduper
from streams.delivery import loop_for
from streams.dlq import dead_letter
from streams.engines.config import STAGE, EngineConfig
from streams.engines.native_state import (
    MARKER_KEY,
    PartitionState,
    RestoreReport,
    entity_value,
    marker_value,
    read_changelog,
    replay_source,
)
from streams.featurize import Featurizer, arrival_ms
from streams.frontdoor import FrontDoor
from streams.kafka import KafkaConfig, Record, admin, ensure_topics
from streams.loop import HeldRecord, Output, TransactionalLoop
from streams.metrics import Heartbeat
from streams.stores import redis_client
from streams.telemetry import StageMetrics, refusal_reason

log = logging.getLogger(__name__)
ENGINE = "native"
CHECKPOINT_S = 5.0         # how long after its change an entity's state is written (bounds the replay at restore)
MAX_DIRTY = 200_000        # ... or sooner, oldest first, while more than this many wait
WRITES_PER_BATCH = 1_000   # due states written per batch at most (more only beyond MAX_DIRTY): a burst of
                           # changes is written over several batches, not in one long pause


def changelog_topic(config: EngineConfig) -> str:
    """The compacted topic holding each entity's checkpointed state, partitioned like the source."""
    return f"{config.app_id}-{ENGINE}-state-changelog"


class _Discard:
    """The output of a replay: what it would produce was committed the first time."""

    def produce(self, *args, **kwargs) -> None:
        pass


class NativeStep:
    """The engine as a TransactionalLoop step: process() is the whole per-batch computation."""

    def __init__(self, config: EngineConfig, deduper: Deduper | None, changelog: str,
                 checkpoint_s: float = CHECKPOINT_S, max_dirty: int = MAX_DIRTY) -> None:
        self.config = config
        self.spec: PipelineSpec = config.spec
        self.door = FrontDoor(config.spec, deduper, stage=STAGE)
        self._replay_door = FrontDoor(config.spec, deduper, stage=STAGE)  # its counts stay out of the heartbeat
        self.changelog = changelog
        self.checkpoint_topics = (changelog,)  # at least once, its state still commits with the offsets
        self.featurize = Featurizer(config.spec)
        self.partitions: dict[int, PartitionState] = {}
        self.checkpoint_s, self.max_dirty = checkpoint_s, max_dirty
        self.restore_report = RestoreReport()
        self.written = 0  # entity states written to the changelog
        self.refused = 0  # valid records the apply step refused (dead-lettered)
        self.refusals: Tally[str] = Tally()  # ... by reason class
        self.late = 0
        # When a list (the fused stage), each live batch's features records are also appended to it, for the
        # stages after: (the record held in memory at its source record's partition and offset, the entity
        # key, the event time in ms, the row), so they need not parse it again.
        self.rows_out: list[tuple[HeldRecord, str, int, FeatureRow]] | None = None

    def entities(self) -> int:
        """How many entities the step holds state for over all its partitions (the heartbeat thread
        reads it while batches run)."""
        return sum(len(s.entities) for s in list(self.partitions.values()))  # list(): atomic, beats read it

    # -- partitions come and go between batches --------------------------------------------------------
    def assigned(self, partitions: list[TopicPartition]) -> None:
        """Restore each partition; each TopicPartition's offset is the group's committed one (< 0: none)."""
        self._restore({tp.partition: tp.offset for tp in partitions})

    def revoked(self, partitions: list[TopicPartition]) -> None:
        """Drop the state of partitions the group took away; what was not written yet is rebuilt by
        their next owner from the changelog and a replay from the marker."""
        for tp in partitions:
            self.partitions.pop(tp.partition, None)

    def aborted(self, batch: Sequence, committed: list[TopicPartition]) -> None:
        """The aborted batch changed the states of its partitions: rebuild them as committed."""
        touched = {m.partition() for m in batch}
        self._restore({tp.partition: tp.offset for tp in committed if tp.partition in touched})

    def _restore(self, committed: dict[int, int]) -> None:
        if not committed:
            return
        started = time.monotonic()
        states, markers, read = read_changelog(self.config.kafka, self.changelog, sorted(committed))
        ranges = {}
        for p, state in states.items():
            c = committed[p]
            if c < 0:  # the group never committed here: nothing was processed, whatever the changelog says
                state.entities.clear()
                continue
            marker = markers.get(p)
            if state.refused:  # what the changelog holds cannot be trusted: all of it is written again
                log.warning("%s[%d]: %d changelog records are not the engine's (%s); rebuilding the partition's "
                            "state from its first record, then writing it whole", self.changelog, p,
                            len(state.refused), next(iter(state.refused.values())))
                self.restore_report.refused += len(state.refused)
                state.entities.clear()
                state.rewrite = True
                marker = None
            elif marker is not None and marker > c:  # the group's offsets were moved back by hand
                log.warning("%s[%d]: the checkpoint covers offsets up to %d but the group resumes at %d; "
                            "rebuilding the partition's state from its first record", self.spec.topics.source,
                            p, marker, c)
                state.entities.clear()
                marker = None
            if marker is None:  # nothing is known to be complete: every entity from the start
                state.as_of.clear()
            state.next_offset, state.marked = c, marker
            ranges[p] = (OFFSET_BEGINNING if marker is None else marker, c)
        self.partitions.update(states)
        replayed = replay_source(self.config.kafka, self.spec.topics.source, ranges, self._replay,
                                 group=f"{self.config.app_id}-replay")
        for p in states:
            self.partitions[p].as_of.clear()
            self._note_changes(self.partitions[p], len(self.partitions[p].dirty))
        report = self.restore_report
        report.changelog_records += read
        report.replayed += replayed
        report.seconds += time.monotonic() - started
        log.info("restored %s partitions %s: %d changelog records, %d source records replayed (%s), "
                 "%d entities, %.1fs", self.spec.topics.source, sorted(committed), read, replayed,
                 ", ".join(f"{p}: {a}..{b}" for p, (a, b) in ranges.items()) or "none", self.entities(),
                 time.monotonic() - started)

    def _replay(self, messages: list[Record]) -> None:
        """Replayed events go to their entity only past the offset its restored state is complete up to."""
        admitted = []
        for msg, ev in self._replay_door.admit(messages, _Discard()):
            part = self.partitions[msg.partition()]
            if msg.offset() >= part.as_of.get(ev.key.encode(), -1):
                admitted.append((msg, ev))
        self._apply(admitted, _Discard())

    # -- the hot path ------------------------------------------------------------------------------------
    def process(self, messages: Sequence, out: Output) -> None:
        """One batch, inside its transaction: the front door, each admitted event's features on its
        entity's live state, each partition's next offset, then the entity states due (write_due)."""
        sizes = {p: len(part.dirty) for p, part in self.partitions.items()}
        self.refused += self._apply(self.door.admit(messages, out), out, counted=True, collect=self.rows_out)
        partitions = self.partitions
        for p, offset in {m.partition(): m.offset() for m in messages}.items():
            part = partitions.get(p)
            if part is None:
                part = partitions[p] = PartitionState()
            part.next_offset = offset + 1
        for p, part in partitions.items():
            self._note_changes(part, len(part.dirty) - sizes.get(p, 0))
        self.write_due(out)

    @staticmethod
    def _note_changes(part: PartitionState, newly_dirty: int) -> None:
        if newly_dirty > 0:
            part.changed_at.append((time.monotonic(), newly_dirty))

    def _apply(self, admitted: list[tuple[Record, Event]], out: Output, counted: bool = False,
               collect: list[tuple[HeldRecord, str, int, FeatureRow]] | None = None) -> int:
        """The feature row of each admitted event, on the live state of its entity (the shared apply
        step); returns how many events it refused (dead-lettered). `counted`: the batch is live (not
        a replay), so its refusals and late events go into the engine's tallies; `collect`: where each
        features record is also appended (see rows_out)."""
        apply, logic = self.featurize.step.apply, self.featurize.logic
        row_value = self.featurize.message
        produce = out.produce
        features_topic, source_topic = self.spec.topics.features, self.spec.topics.source
        partitions = self.partitions
        refused = 0
        for msg, ev in admitted:
            p = msg.partition()
            part = partitions.get(p)
            if part is None:
                part = partitions[p] = PartitionState()
            table = part.entities
            key = ev.key.encode()
            state = table.get(key)
            if state is None:
                state = logic.new_state()
            elif type(state) is bytes:
                state = table[key] = logic.loads(state)
            # `type(state) is bytes` above, the fast check, narrows only its own branch: state is live here
            arrival = arrival_ms(msg)
            row = apply(state, ev, arrival)  # type: ignore[arg-type]
            if type(row) is Refused:  # the state is untouched
                letter = dead_letter(self.spec.topics.dlq, msg, row, STAGE)
                produce(letter.topic, letter.value, letter.key, headers=letter.headers)
                refused += 1
                if counted:
                    self.refusals[refusal_reason(row)] += 1
                continue
            if not row.late:
                table[key] = state
                if key not in part.dirty:
                    part.dirty[key] = msg.offset()
            elif counted:
                self.late += 1
            # The source record's timestamp carries on (as Kafka Streams does), so each later stage's
            # latency is measured from the event's arrival: end to end at the scorer.
            value = row_value(ev, row)
            produce(features_topic, value, key, partition=p, timestamp=arrival or 0)
            if collect is not None:
                collect.append((HeldRecord(value, key, source_topic, p, msg.offset(), arrival or 0), ev.key,
                                ev.event_time_ms, row))
        return refused

    def write_due(self, out: Output) -> None:
        """Into the current transaction: the states changed for checkpoint_s or longer (and the
        oldest beyond max_dirty waiting), then each partition's marker where it moved."""
        produce, topic = out.produce, self.changelog
        due_before = time.monotonic() - self.checkpoint_s
        waiting = sum(len(part.dirty) for part in self.partitions.values())
        excess = max(0, waiting - self.max_dirty)
        budget_each = max(1, WRITES_PER_BATCH // max(1, len(self.partitions)))  # an even share: none starves
        for p, part in self.partitions.items():
            if part.rewrite:
                self._rewrite(p, part, out)
                continue
            count, budget = 0, budget_each
            changed_at = part.changed_at
            while changed_at and changed_at[0][0] <= due_before and count < budget:
                at, n = changed_at.popleft()
                if count + n > budget:  # the rest of that batch's changes waits for the next batch
                    changed_at.appendleft((at, count + n - budget))
                    n = budget - count
                count += n
            if excess and waiting:
                count += -(-excess * len(part.dirty) // waiting)  # this partition's share, rounded up
            count = min(count, len(part.dirty))
            if count:
                table, dirty, as_of = part.entities, part.dirty, part.next_offset
                assert as_of is not None  # an entity is dirty once a record of its partition was processed
                for _ in range(count):
                    key, _first = dirty.popitem(last=False)
                    produce(topic, self._entity_value(as_of, table[key]), key, partition=p)
                self.written += count
            marker = part.replay_from()
            if marker is not None and marker != part.marked:
                produce(topic, marker_value(marker), MARKER_KEY, partition=p)
                part.marked = marker

    def _entity_value(self, as_of: int, state: EntityState | bytes) -> bytes:
        """An entity's changelog value; a state still in its restored bytes is written as it came."""
        # as in _apply: `type(state) is bytes` narrows only its own branch
        return entity_value(as_of, state if type(state) is bytes else self.featurize.logic.dumps(state))  # type: ignore[arg-type]

    def _rewrite(self, p: int, part: PartitionState, out: Output) -> None:
        """Into the current transaction: every entity of the partition, a tombstone for each refused key
        that is no entity, and the marker, so the changelog holds only the engine's records again."""
        produce, topic, as_of = out.produce, self.changelog, part.next_offset
        assert as_of is not None  # set by the restore that asked for the rewrite
        for key, state in part.entities.items():
            produce(topic, self._entity_value(as_of, state), key, partition=p)
        for key in part.refused.keys() - part.entities.keys() - {MARKER_KEY}:
            produce(topic, None, key, partition=p)
        produce(topic, marker_value(as_of), MARKER_KEY, partition=p)
        self.written += len(part.entities)
        part.dirty.clear()
        part.changed_at.clear()
        part.refused.clear()
        part.marked, part.rewrite = as_of, False


def source_partitions(kafka: KafkaConfig, topic: str) -> int:
    """How many partitions the topic has (the changelog gets as many)."""
    metadata = admin(kafka).list_topics(topic, timeout=30)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise RuntimeError(f"source topic {topic!r} does not exist; `eddy up` creates it")
    return len(found.partitions)


def build_native(config: EngineConfig, redis_client, checkpoint_s: float = CHECKPOINT_S,
                 replica: int = 0, metrics: StageMetrics | None = None) -> tuple[NativeStep, TransactionalLoop]:
    """The engine's step and the loop that runs it (creating the changelog topic when missing)."""
    spec = config.spec
    changelog = changelog_topic(config)
    ensure_topics(config.kafka, [changelog], source_partitions(config.kafka, spec.topics.source),
                  configs={"cleanup.policy": "compact"})
    step = NativeStep(config, Deduper(redis_client, spec.name), changelog, checkpoint_s=checkpoint_s)
    loop = loop_for(spec.guarantee, config.kafka, config.app_id, [spec.topics.source],
                    transactional_id=f"{config.app_id}-{ENGINE}-{replica}",
                    batch_size=config.batch_size, batch_wait_s=config.batch_wait_s,
                    min_interval_s=config.commit_interval_s, metrics=metrics)
    return step, loop


def export_counts(step: NativeStep, metrics: StageMetrics) -> None:
    """The engine's counts into its stage's metrics; its dead letters by reason are the caller's to
    add (the fused stage adds the scorer's)."""
    spec, counts = step.spec, step.door.counts
    metrics.total(metrics.records_out.labels(spec.name, STAGE, spec.topics.features), counts.valid - step.refused)
    metrics.total(metrics.duplicates, counts.duplicates)
    metrics.total(metrics.late, step.late)
    metrics.entities.set(step.entities())
    metrics.total(metrics.state_writes, step.written)


def beat_fields(step: NativeStep, loop: TransactionalLoop, **extra: Any) -> tuple[int, dict[str, Any]]:
    """The engine's heartbeat (`eddy status`, the tests' and tools' counts): the records it has seen,
    and its fields."""
    counts, restored = step.door.counts, step.restore_report
    return (counts.valid + counts.invalid + counts.duplicates,
            dict(engine=ENGINE, guarantee=step.spec.guarantee, valid=counts.valid - step.refused, dlq=counts.invalid + step.refused,
                 duplicates=counts.duplicates, entities=step.entities(), states_written=step.written,
                 restored=restored.changelog_records, replayed=restored.replayed,
                 changelog_refused=restored.refused, **loop.stats.summary(), **extra))


def run_native(config: EngineConfig, checkpoint_s: float = CHECKPOINT_S, metrics: StageMetrics | None = None,
               worker: int = 0) -> None:
    """Run native engine worker `worker` in this process until SIGTERM (with `metrics`, exported about once a
    second). Workers share the consumer group and split the source's partitions, each restoring the
    states of the partitions it is assigned from the changelog; each has a transactional id of its own."""
    spec = config.spec
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client = redis_client(config.redis_url)
    step, loop = build_native(config, client, checkpoint_s, replica=worker, metrics=metrics)
    heartbeat = Heartbeat(client, spec.name, STAGE)

    def beat() -> None:
        if metrics is not None:
            export_counts(step, metrics)
            metrics.refusals(step.door.counts.refused + step.refusals)
        seen, fields = beat_fields(step, loop)
        heartbeat.beat(seen, force=True, **fields)

    def beat_every_second() -> None:
        while not stop.wait(1.0):
            try:
                beat()
            except Exception:  # noqa: BLE001 - a heartbeat never ends the engine, nor itself
                log.exception("heartbeat failed")

    beat()
    threading.Thread(target=beat_every_second, name="heartbeat", daemon=True).start()
    log.info("native engine: %s -> %s (entity states written %.0fs after they change, to %s)",
             spec.topics.source, spec.topics.features, checkpoint_s, step.changelog)
    try:
        loop.run(step, stop.is_set)
    finally:
        stop.set()
        beat()
