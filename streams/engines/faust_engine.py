"""The Faust feature engine: an agent per source partition over the shared front door and Featurizer.

Entity state lives in a Faust table (changelog in Kafka) and the app runs with exactly-once processing,
so outputs, DLQ records, state changes and offsets commit together; a killed worker loses nothing.

Faust alone is not exactly once across a restart: it hands a partition's records over around the seek
that ends a table restore, and some come twice or not at all (upstream faust-streaming #221 and #323). So
the table also keeps, per source partition, the next offset its state covers (`_Positions`), committed in
the same transaction as the rows: a batch waits for the restore to end, drops what its partition's
position already covers, and reads a skipped stretch back from Kafka itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter as Tally
from typing import Any

from features.apply import Refused
from features.errors import SpecError
from features.windows import EntityState, FeatureLogic
from streams.dedupe import Deduper
from streams.dlq import dead_letter
from streams.engines.config import STAGE, EngineConfig
from streams.engines.native_state import replay_source
from streams.featurize import Featurizer, arrival_ms
from streams.frontdoor import FrontDoor
from streams.kafka import KafkaConfig, wait_for_broker
from streams.metrics import Heartbeat
from streams.stores import redis_client
from streams.telemetry import StageMetrics, refusal_reason

log = logging.getLogger(__name__)


class _Message:
    """A Faust message seen through the confluent-kafka Message methods the front door uses (a
    streams.kafka.Record)."""

    __slots__ = ("_m",)

    def __init__(self, message) -> None:
        self._m = message

    def key(self) -> bytes | None:
        return self._m.key

    def value(self) -> bytes | None:
        return self._m.value

    def topic(self) -> str:
        return self._m.topic

    def partition(self) -> int:
        return self._m.partition

    def offset(self) -> int:
        return self._m.offset

    def error(self) -> None:
        """Always None: Faust hands over records, never error events."""
        return None

    def timestamp(self) -> tuple[int, int]:
        ts = self._m.timestamp  # seconds as a float, from the record's epoch ms
        return (0, -1) if ts is None else (1, round(ts * 1000))

    def headers(self):
        headers = self._m.headers
        return list(headers.items()) if isinstance(headers, dict) else list(headers or [])


class _Collect:
    """Collects what the front door produces (dead letters) so the agent can send them in its transaction."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes | None, bytes | None, list]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, *args: Any,
                headers: list | None = None, **kwargs: Any) -> None:
        """Keep a record for the agent to send, on the batch's partition (other producer options are
        not used by the front door and are ignored)."""
        self.items.append((topic, key, value, headers or []))


class _CommitGate:
    """Batches and Faust's periodic commit exclude each other, the commit taking precedence.

    Faust commits a partition's transaction on a timer. A commit landing between two sends of one
    batch would make part of the batch's output visible with offsets that do not cover it, and a
    crash then duplicates that part. So batches share the gate, a commit holds it alone, and once a
    commit waits no new batch enters (else a steady stream would starve commits and delay output)."""

    def __init__(self) -> None:
        self.batches = 0
        self.commit_waiting = False
        self.committing = False
        self.changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: not (self.commit_waiting or self.committing))
            self.batches += 1

    async def __aexit__(self, *exc) -> None:
        async with self.changed:
            self.batches -= 1
            self.changed.notify_all()

    async def exclusive(self, work):
        async with self.changed:
            self.commit_waiting = True
            await self.changed.wait_for(lambda: self.batches == 0 and not self.committing)
            self.commit_waiting, self.committing = False, True
        try:
            return await work()
        finally:
            async with self.changed:
                self.committing = False
                self.changed.notify_all()

    def guard(self, consumer) -> None:
        """Route the consumer's commits through the gate (once per consumer)."""
        if getattr(consumer, "_eddy_gated", False):
            return
        commit = consumer.commit

        async def gated_commit(*args, **kwargs):
            return await self.exclusive(lambda: commit(*args, **kwargs))

        consumer.commit = gated_commit
        consumer._eddy_gated = True


@contextlib.asynccontextmanager
async def _all_or_exit(partition: int):
    """A batch either sends all of its output or ends the process at once.

    Faust acks a batch's records as its take_events generator closes, whatever ended the batch, and a
    later commit would then store offsets past output that was never sent: events lost. Exiting
    without a commit leaves the open transaction to be aborted when the restarted worker takes the
    partition's transactional id, and the worker resumes from the last committed offsets."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - any end of a half-sent batch, cancellation included
        log.critical("a batch of partition %d ended before all its output was sent (%r): exiting without "
                     "a commit, to resume from the last committed offsets", partition, exc)
        logging.shutdown()
        os._exit(70 if not isinstance(exc, asyncio.CancelledError) else 0)


POSITION = b"\x00eddy.position."  # + the source partition's number: a table key no entity has


def position_key(partition: int) -> bytes:
    return POSITION + str(partition).encode()


class _Positions:
    """Per source partition, the next source offset the table's state covers, kept in the table itself.

    It is written with each batch's state, in the transaction that commits the batch's source offsets, so
    after a restore it says exactly which records the restored state has seen, whatever Faust hands over:
    - a record below the position was processed and committed already (Faust hands some over twice, around
      the seek that ends a restore and at the end of a quiet partition): it is acked and dropped, its row
      is out already;
    - a record above it follows a stretch Faust skipped (its read offset had moved past it), or transaction
      markers: the stretch is read back from the source (read_committed, as the native engine replays its
      source) and processed before it, in the same transaction."""

    def __init__(self, kafka: KafkaConfig, topic: str, group: str) -> None:
        self.kafka = kafka
        self.topic = topic
        self.group = group  # the stage's own, which its ACL allows (assign() only: no group forms)
        self.redelivered = 0  # records dropped because the position already covered them
        self.recovered = 0  # skipped records read back from Kafka

    @staticmethod
    def of(store, partition: int) -> int | None:
        value = store.get(position_key(partition))
        return None if value is None else int(value)

    def skipped(self, partition: int, start: int, end: int) -> list:
        """The committed source records of `partition` in [start, end), read back as the native engine
        replays its source (blocking: run it in a thread). Transaction markers come back as nothing."""
        out: list = []
        replay_source(self.kafka, self.topic, {partition: (start, end)}, out.extend, self.group, timeout_s=120)
        return out


class _Repairs:
    """The entity-state changelog records a restore refused, and the keys to write again.

    A record that is not a state this engine wrote (pickled bytes, NaN, JSON of another shape: anything
    the engine's own loads cannot read) is refused with its reason instead of restored, so its key keeps
    its last good state and nothing is ever unpickled. Restored, such a record made the worker exit at the
    key's next event, after every restart: a crash loop. The agent writes each refused key's good state
    again in its next transaction on the key's own partition, so the poison stops being the key's latest
    record there before compaction can drop the good one behind it. Elsewhere nothing is written: the table
    is one dict across partitions, and a tombstone on another partition could delete the key's state at a
    later restore. A state written for another feature layout is not poison but a changed spec: it is
    restored, and its first use says how to rebuild."""

    def __init__(self, logic: FeatureLogic) -> None:
        self.logic = logic
        self.changelog = ""  # the table's changelog topic, named once the table exists
        self.pending: dict[int, dict[bytes, str]] = {}  # partition -> refused key -> reason
        self.reported: set[int] = set()
        self.refused = 0

    def reason(self, key: bytes | None, value: bytes) -> str | None:
        if key is not None and key.startswith(POSITION):
            return None if value.isdigit() else "a source position that is not a number"
        try:
            self.logic.loads(value)
        except SpecError:
            return None
        except (ValueError, TypeError) as exc:  # orjson's JSONDecodeError is a ValueError
            return f"{type(exc).__name__}: {exc}"[:200]
        return None

    def checked(self, batch):
        """The changelog events of `batch` that restore: tombstones, and values the engine can read."""
        for event in batch:
            message = event.message
            why = None if message.value is None else self.reason(message.key, message.value)
            if why is None:
                yield event
                continue
            self.pending.setdefault(message.partition, {})[message.key] = why
            self.refused += 1

    def report(self) -> None:
        """Log each partition's refusals once, when its restore is complete."""
        for partition, keys in sorted(self.pending.items()):
            if partition not in self.reported:
                self.reported.add(partition)
                log.warning("%s[%d]: %d changelog records are not the engine's (%s); refused, nothing unpickled: "
                            "each key keeps its last good state, written again on its own partition with the "
                            "next batch", self.changelog, partition, len(keys), next(iter(keys.values())))

    def take(self, partition: int, home) -> list[bytes]:
        """The refused keys of `partition` whose good state lives there (`home(key)` is that partition), to
        write again now; the partition's refusals are then settled."""
        self.reported.discard(partition)
        return [key for key in self.pending.pop(partition, {}) if home(key) == partition]


def _checked_table(app, name: str, repairs: _Repairs, **options):
    """A Faust table in memory whose restore goes through `repairs` (faust.Table with its store's changelog
    batches filtered); its store's home(key) is the partition the key's restored state came from."""
    import faust
    from faust.stores.memory import Store

    class CheckedStore(Store):
        def _create_batch_iterator(self, mark_as_delete, to_key, to_value, batch):
            return super()._create_batch_iterator(mark_as_delete, to_key, to_value, repairs.checked(batch))

        async def on_recovery_completed(self, active_tps, standby_tps) -> None:
            await super().on_recovery_completed(active_tps, standby_tps)
            repairs.report()

        def home(self, key: bytes) -> int | None:
            return self._key_partition.get(key) if key in self.data else None

    class CheckedTable(faust.Table):
        def _new_store_by_url(self, url):
            return CheckedStore(url, self.app, self, table_name=self.name, key_type=self.key_type,
                                key_serializer=self.key_serializer, value_serializer=self.value_serializer,
                                value_type=self.value_type, loop=self.loop, options=self.options)

    return CheckedTable(app, name=name, beacon=app.tables.beacon, **options)


def _credentials(kafka: KafkaConfig):
    """Faust credentials from the shared client properties (SASL and/or SSL)."""
    import ssl

    from faust.auth import SASLCredentials, SSLCredentials

    props = kafka.properties
    protocol = props.get("security.protocol", "PLAINTEXT").upper()
    if protocol == "PLAINTEXT":
        return None
    context = None
    if "SSL" in protocol:
        context = ssl.create_default_context(cafile=props.get("ssl.ca.location"))
        if props.get("ssl.certificate.location"):
            context.load_cert_chain(props["ssl.certificate.location"], props.get("ssl.key.location"),
                                    props.get("ssl.key.password"))
    if protocol.startswith("SASL"):
        return SASLCredentials(username=props.get("sasl.username"), password=props.get("sasl.password"),
                               mechanism=props.get("sasl.mechanisms") or props.get("sasl.mechanism", "PLAIN"),
                               ssl_context=context)
    return SSLCredentials(context)


def build_app(config: EngineConfig, metrics: StageMetrics | None = None):
    """The Faust app of the feature stage, not started: the agent per source partition over the
    front door and the apply step, its entity state table, and the heartbeat timer."""
    import faust

    spec = config.spec
    app = faust.App(
        config.app_id,
        broker=[f"kafka://{host}:{port}" for host, port in config.kafka.hosts],
        broker_credentials=_credentials(config.kafka),
        store="memory://",
        processing_guarantee="exactly_once",
        topic_partitions=config.partitions,
        # its changelog on as many replicas as eddy's own topics get (three on a cluster of three or more)
        topic_replication_factor=min(3, wait_for_broker(config.kafka, timeout_s=60)),
        broker_commit_interval=config.commit_interval_s,
        # A killed worker's partitions go to its successor once the group gives up on it: after 10 s,
        # not Faust's default 60 (the consumer heartbeats from its own thread, so a long batch is no risk)
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        datadir=str(config.data_dir),
        key_serializer="raw",
        value_serializer="raw",
    )
    source = app.topic(spec.topics.source, key_type=bytes, value_type=bytes, partitions=config.partitions)
    door = FrontDoor(spec, Deduper(redis_client(config.redis_url), spec.name), stage=STAGE)
    featurize = Featurizer(spec)
    logic, apply = featurize.logic, featurize.step.apply
    repairs = _Repairs(logic)
    states = _checked_table(app, "entity-state", repairs, default=None, partitions=config.partitions,
                            key_type=bytes, value_type=bytes)
    app.tables.add(states)

    def transactional_id(partition: int) -> str:
        # The id Faust commits the source partition's offsets under. Faust picks the id of a send from
        # the *consumer's* metadata, which lacks topics it only writes, and then sends outside any
        # transaction; so every write here names the source partition's transaction itself.
        return f"{app.conf.id}-{app.assignor.group_for_topic(spec.topics.source)}-{partition}"

    changelog = repairs.changelog = states.changelog_topic.get_topic_name()
    gate = _CommitGate()
    refused = [0]  # valid records the apply step refused (dead-lettered)
    refusals: Tally[str] = Tally()  # ... by reason class

    positions = _Positions(config.kafka, spec.topics.source, config.app_id)

    async def restored(partition: int) -> None:
        """Until the table's restore has ended and the streams are sought to their committed offsets (Faust
        may hand records over before that, and the state they meet is then not the restored one)."""
        recovery = app.tables.recovery  # type: ignore[attr-defined]  # faust.tables.Recovery (0.15.3, pinned)
        rebalances = app.rebalancing_count
        while app.in_recovery or not recovery.completed.is_set():
            if app.rebalancing_count != rebalances:
                # Faust's rebalance waits for this batch to be acked, and the batch for the restore that
                # rebalance holds up: end the process without a commit instead, for supervision to restart
                log.critical("a rebalance began while a batch of partition %d waited for the table's restore: "
                             "exiting without a commit, to resume from the last committed offsets", partition)
                logging.shutdown()
                os._exit(70)
            await asyncio.sleep(0.05)

    async def unseen(batch, partition: int) -> list:
        """The batch's records the table's state has not seen, in offset order, each as a streams.kafka.Record:
        those Faust handed over again are dropped, and a stretch Faust skipped is read back from Kafka."""
        expect = positions.of(states.data, partition)
        if expect is None:  # a table from before positions were kept: from the batch's first record on
            expect = batch[0].message.offset
        out: list = []
        again = 0
        for event in batch:
            message = event.message
            if message.offset < expect:
                again += 1
                continue
            if message.offset > expect:  # a skipped stretch, or transaction markers (they read back as nothing)
                back = await asyncio.to_thread(positions.skipped, partition, expect, message.offset)
                if back:
                    positions.recovered += len(back)
                    log.warning("%s[%d]: %d records at offsets %d to %d were skipped by Faust; read back from "
                                "Kafka and processed in order", spec.topics.source, partition, len(back), expect,
                                message.offset - 1)
                    # Faust commits a partition only up to its first offset never acked: mark the stretch done
                    # (Consumer._add_gap of faust-streaming 0.15.3, pinned)
                    add_gap = app.consumer._add_gap  # type: ignore[attr-defined]
                    await add_gap(message.tp, expect, message.offset - 1)
                    out.extend(back)
            out.append(_Message(message))
            expect = message.offset + 1
        if again:
            positions.redelivered += again
            log.warning("%s[%d]: %d records handed over again below the state's position; dropped, their rows "
                        "are out already", spec.topics.source, partition, again)
        return out

    # One actor per partition: state, output and dead letters of an event go to that event's partition,
    # in the transaction that commits its source offset.
    @app.agent(source, name="compute", isolated_partitions=True)
    async def compute(stream):
        gate.guard(app.consumer)
        store = states.data
        send = app.producer.send
        async for batch in stream.take_events(config.batch_size, within=config.batch_wait_s):
            partition = batch[0].message.partition
            tid = transactional_id(partition)
            await restored(partition)
            async with gate, _all_or_exit(partition):
                sink = _Collect()
                for key in repairs.take(partition, store.home):  # first: a state this batch changes comes after
                    await send(changelog, key, store[key], partition, None, None, transactional_id=tid)
                live: dict[bytes, EntityState] = {}  # states this batch changed, parsed once, written once
                started = time.perf_counter()
                messages = await unseen(batch, partition)
                for msg, ev in door.admit(messages, sink):
                    key = ev.key.encode()
                    state = live.get(key)
                    if state is None:
                        stored = store.get(key)
                        state = logic.loads(stored) if stored else logic.new_state()
                    arrival = arrival_ms(msg)
                    row = apply(state, ev, arrival)
                    if type(row) is Refused:  # the state is untouched
                        letter = dead_letter(spec.topics.dlq, msg, row, STAGE)
                        sink.produce(letter.topic, letter.value, letter.key, headers=letter.headers)
                        refused[0] += 1
                        refusals[refusal_reason(row)] += 1
                        continue
                    if not row.late:
                        live[key] = state
                    # the source record's timestamp carries on (Faust takes seconds), as in the native engine
                    await send(spec.topics.features, key, featurize.message(ev, row), partition,
                               arrival / 1000 if arrival else None, None, transactional_id=tid)
                for key, state in live.items():
                    store[key] = value = logic.dumps(state)
                    await send(changelog, key, value, partition, None, None, transactional_id=tid)
                if messages:  # the state now covers the batch: in its transaction, with its offsets
                    key, value = position_key(partition), str(messages[-1].offset() + 1).encode()
                    store[key] = value
                    await send(changelog, key, value, partition, None, None, transactional_id=tid)
                for topic, letter_key, letter_value, headers in sink.items:
                    await send(topic, letter_key, letter_value, partition, None, headers, transactional_id=tid)
                for event in batch:  # acked inside the gate, so the next commit covers the whole batch
                    await stream.ack(event)
                if metrics is not None:  # counted as sent: Faust commits them on its own timer
                    metrics.consumed(messages)
                    metrics.batch(len(messages), time.perf_counter() - started)
                    metrics.latencies(time.time() * 1000, [m.timestamp()[1] for m in messages])

    heartbeat = Heartbeat(redis_client(config.redis_url), spec.name, STAGE)

    @app.timer(1.0)
    async def report() -> None:
        counts = door.counts
        heartbeat.beat(counts.valid + counts.invalid + counts.duplicates, force=True, engine="faust",
                       valid=counts.valid - refused[0], dlq=counts.invalid + refused[0],
                       duplicates=counts.duplicates, changelog_refused=repairs.refused,
                       redelivered=positions.redelivered, read_back=positions.recovered)
        if metrics is not None:
            metrics.total(metrics.records_out.labels(spec.name, STAGE, spec.topics.features),
                          counts.valid - refused[0])
            metrics.total(metrics.duplicates, counts.duplicates)
            metrics.refusals(counts.refused + refusals)

    return app


def run_worker(config: EngineConfig, loglevel: str = "info", metrics: StageMetrics | None = None) -> None:
    """Run the Faust worker in this process until SIGTERM."""
    import faust

    app = build_app(config, metrics)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False, override_logging=False)
    worker.execute_from_commandline()
