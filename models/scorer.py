"""The in-stream scorer: features records in, predictions out, one model call per micro-batch.

Each batch is one Kafka transaction (streams.loop), so a read_committed consumer sees exactly one
prediction per features record even when a scorer is killed mid-batch. A new model is swapped in
between batches, never inside one, so each batch names exactly one model version."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter, methodcaller
from typing import Any

import numpy as np
import orjson
from redis.exceptions import RedisError

from features.errors import EddyError
from features.spec import PipelineSpec
from features.validation import iso_ms
from features.waiting import poll
from models.drift import WINDOW_ROWS, DriftWindow, measures, publish_snapshot
from models.errors import InputError
from models.inputs import rows_to_array
from models.manifest import Manifest
from models.rollout import Route, canary_mask
from models.scoring import LoadedModel, pick_device
from models.signing import TrustedKeys
from models.state import HistoryStore, append_once, history_before
from models.store import ObjectStore
from models.updates import UpdateListener
from streams.delivery import loop_for
from streams.dlq import dead_letter
from streams.kafka import KafkaConfig
from streams.loop import Output
from streams.metrics import Heartbeat
from streams.stores import redis_client
from streams.telemetry import StageMetrics

log = logging.getLogger(__name__)
STAGE = "scorer"
_PREDICTION_FIELDS = frozenset({"score", "model_version", "role", "scored_at"})
DRIFT_EVERY_S = 5  # how often a replica reports its drift window
_value, _key = methodcaller("value"), methodcaller("key")
_first, _tail, _features = itemgetter(0), itemgetter(slice(1, None)), itemgetter("features")


@dataclass(frozen=True)
class ScorerConfig:
    """What a scorer replica runs with, built by deploy from Settings."""

    kafka: KafkaConfig
    spec: PipelineSpec
    redis_url: str
    device: str
    model_key: TrustedKeys  # public keys only: a scorer verifies, never signs
    replica: int = 0
    batch_size: int = 4096
    batch_wait_s: float = 0.1         # an idle poll's wait for the first record (a batch never waits to fill)
    commit_interval_s: float = 0.05   # at most one transaction per this long (each costs the broker CPU)
    history: int = 16              # feature rows kept per entity for sequence models
    model_wait_s: float = 120.0    # how long to wait at start for a model on the updates topic
    drift_window: int = WINDOW_ROWS  # rows of the live window drift is measured on (0: no drift)
    store: ObjectStore | None = None  # where s3:// artifacts are fetched from (None: local ones only)

    @property
    def group(self) -> str:
        """The scorers' consumer group: replicas share it and split the features topic's partitions."""
        return self.spec.stage_id(STAGE)


class Scorer:
    """The scoring Step: process() scores a batch with the serving model and emits predictions."""

    def __init__(self, config: ScorerConfig, redis_client) -> None:
        self.config = config
        self.spec = config.spec
        self.device = pick_device(config.device)
        self.serving: LoadedModel | None = None                   # the model in use (the champion)
        self.challenger: LoadedModel | None = None                # a rollout's challenger, when one runs
        self.route: Route | None = None                           # the rollout's state (models.rollout)
        # model swaps and rollout steps from the update listener, applied in order between batches
        self._pending: list[tuple[str, dict, LoadedModel | None]] = []
        self._lock = threading.Lock()
        self.swaps: list[dict] = []
        self.rows = 0
        self.batches = 0
        self.bad_records = 0
        self.refusals: Tally[str] = Tally()  # dead letters by reason class
        self.by_version: dict[str, dict[str, float]] = {}  # rows, refused, model_s per version (rollout evidence)
        self.metrics: StageMetrics | None = None
        self.drift: DriftWindow | None = None  # the serving version's live window, when it has a reference
        self._required = itemgetter("features", "event_id", self.spec.key, "event_time")
        self.history = (HistoryStore(redis_client, self.spec.name, config.history)
                        if self.spec.model.kind == "sequence" else None)
        # Where a record sits, tagging the history rows it adds (so a redone batch adds none twice): the
        # features record's partition and offset; the fused stage tags by the source record instead.
        self.position: Callable[[Any], tuple[int | str, int]] = features_position
        self.listener = UpdateListener(config.kafka, self.spec, config.model_key, self.device,
                                       on_ready=self._ready, serving=lambda: self.serving, on_rollout=self._rollout,
                                       store=config.store)

    def _ready(self, loaded: LoadedModel, message: dict) -> None:
        with self._lock:
            self._pending.append(("serve", message, loaded))

    def _rollout(self, message: dict, loaded: LoadedModel | None) -> None:
        with self._lock:
            self._pending.append(("rollout", message, loaded))

    def swap_if_ready(self) -> None:
        """Apply what the update listener has handed over (a model to serve, a rollout's step or end), in
        topic order; called between batches and when idle, never during a batch, so each batch is
        scored under one state."""
        with self._lock:
            pending, self._pending = self._pending, []
        for kind, message, loaded in pending:
            if kind == "serve" and loaded is not None:
                self._serve(loaded, message)
            elif kind == "rollout":
                self._step(message, loaded)

    def _serve(self, loaded: LoadedModel, message: dict) -> None:
        previous = self.serving.version if self.serving is not None else None
        self.serving = loaded
        self.drift = drift_window(loaded, self.config.drift_window)
        self.swaps.append({"version": loaded.version, "from": previous, "at": time.time(),
                           "published_at": message.get("published_at"), "load_ms": message.get("load_ms"),
                           "action": message.get("action", "publish")})
        log.info("serving model %s (was %s, %s, loaded in %s ms)", loaded.version, previous,
                 message.get("action", "publish"), message.get("load_ms"))

    def _step(self, message: dict, loaded: LoadedModel | None) -> None:
        """A rollout step (the challenger, newly loaded or the one held, at this step's mode and weight),
        or its end: promoted (the challenger serves everything from now), rolled back or aborted."""
        state = message["rollout"]
        if message["action"] == "rollout_end":
            if state.get("outcome") == "promoted" and self.challenger is not None \
                    and self.challenger.version == message["version"]:
                self._serve(self.challenger, message)
            log.info("rollout %s of %s ended: %s (%s)", state["id"], message["version"], state.get("outcome"),
                     state.get("reason"))
            self.challenger, self.route = None, None
            return
        if loaded is not None:
            self.challenger = loaded
        if self.challenger is None or self.challenger.version != message["version"]:
            log.warning("rollout %s names %s, which is not loaded here: the champion serves alone", state["id"],
                        message["version"])
            self.route = None
            return
        self.route = Route.from_message(message)
        log.info("rollout %s: %s as %s at %s%% against %s", self.route.rollout_id, self.route.challenger,
                 self.route.mode, self.route.percent, self.route.champion)

    def wait_for_model(self) -> None:
        """Block until the updates topic has been replayed and a model serves; EddyError after
        config.model_wait_s without one."""

        def serving() -> bool:
            self.swap_if_ready()
            return self.serving is not None and self.listener.caught_up.is_set()

        if poll(serving, self.config.model_wait_s, every_s=0.05):
            return
        raise EddyError(f"no servable model on {self.spec.topics.model_updates!r} after "
                        f"{self.config.model_wait_s:.0f}s: run `eddy up` (it publishes the baseline) or `eddy promote`")

    def process(self, messages: Sequence, out: Output) -> None:
        """One batch, inside its transaction: unreadable records to the DLQ, then one model call per version,
        one served prediction per record and, during a rollout, one shadow prediction per record by the
        other version (in shadow the challenger's; as a canary each version's of the other's entities).
        EddyError when no model serves yet (run_scorer waits for one first)."""
        self.swap_if_ready()
        model = self.serving
        if model is None or model.version is None:  # run_scorer waits for a model (an artifact) first
            raise EddyError("no model serves yet: wait_for_model() comes before the first batch")
        records = self._parse_all(messages)
        if records is None:  # some record is not a features record: sort them one by one
            records, kept = self._parse_each(messages, out)
        else:
            kept = list(messages)
        route, challenger = self.route, self.challenger
        if challenger is None or route is None:
            route = None
        raw = self._inputs(model, route, kept, records, out)
        if raw is None:  # every record went to the DLQ
            return
        stored = self._histories(kept, records) if self.history is not None else None
        topics = self.spec.topics
        everyone = np.arange(len(records))
        if route is None or route.mode == "shadow":
            scores = self._call(model, raw, stored, everyone)
            self._emit(model.version, "champion", topics.predictions, kept, records, scores, out)
            if self.drift is not None:
                self.drift.add(raw, scores)
            if route is not None and challenger is not None:
                shadow = self._call(challenger, raw, stored, everyone)
                self._emit(challenger.version, "shadow", topics.shadow, kept, records, shadow, out)
        else:
            # Both versions score every record: each serves its own entities and scores the other's in
            # shadow, so the judge compares the two on the same events (paired), never one half of the
            # entities against the other.
            assert challenger is not None
            canary = canary_mask([m.key() for m in kept], route.weight)
            both = {"champion": self._call(model, raw, stored, everyone),
                    "canary": self._call(challenger, raw, stored, everyone)}
            for who, role, rows, other in ((model, "champion", np.flatnonzero(~canary), "canary"),
                                           (challenger, "canary", np.flatnonzero(canary), "champion")):
                if not rows.size:
                    continue
                scores = both[role][rows]
                batch_kept, batch_records = [kept[i] for i in rows], [records[i] for i in rows]
                self._emit(who.version, role, topics.predictions, batch_kept, batch_records, scores, out)
                shadow_of = challenger if other == "canary" else model
                self._emit(shadow_of.version, "shadow", topics.shadow, batch_kept, batch_records, both[other][rows], out)
                if role == "champion" and self.drift is not None:
                    self.drift.add(raw[rows], scores)
        if stored is not None and self.history is not None:
            self.history.put_many(stored[1])
        self.rows += len(records)
        self.batches += 1

    def _inputs(self, model: LoadedModel, route: Route | None, kept: list, records: list[dict],
                out: Output) -> np.ndarray | None:
        """The batch's raw feature values [B, F]; a row the model cannot take goes to the DLQ (kept and
        records shrink in place) and is counted against the version it was routed to. None when none is left."""
        while records:
            try:
                return rows_to_array(list(map(_features, records)), model.normaliser.names)
            except InputError as exc:
                if exc.row is None:
                    raise
                msg = kept.pop(exc.row)
                records.pop(exc.row)
                letter = dead_letter(self.spec.topics.dlq, msg, f"features the model cannot take: {exc}", STAGE)
                out.produce(letter.topic, letter.value, letter.key, headers=letter.headers)
                self.bad_records += 1
                self.refusals["model_input"] += 1
                to_canary = route is not None and route.mode == "canary" and bool(canary_mask([msg.key()], route.weight)[0])
                self._count(route.challenger if route is not None and to_canary else (model.version or ""), refused=1)
        return None

    def _call(self, model: LoadedModel, raw: np.ndarray, stored, rows: np.ndarray) -> np.ndarray:
        """One model call for the batch's `rows`: of raw values, or of each entity's history ending with the
        row (`stored`: the sequences built once for the batch)."""
        started = time.perf_counter()
        if stored is None:
            scores = model.score(raw if rows.size == len(raw) else raw[rows])
        else:
            sequences = stored[0]
            scores = model.score_sequences(sequences if rows.size == len(sequences) else [sequences[i] for i in rows])
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.model_call(int(rows.size), seconds)
        self._count(model.version or "", rows=int(rows.size), model_s=seconds)
        return scores

    def _count(self, version: str, **add: float) -> None:
        counts = self.by_version.setdefault(version, {"rows": 0, "refused": 0, "model_s": 0.0})
        for name, value in add.items():
            counts[name] += value

    def _parse_all(self, messages: Sequence) -> list[dict] | None:
        """The batch's records when every one is a features record with its id, key, time and a
        features object (the batch's work in C: no per-record Python), else None."""
        try:
            records = list(map(orjson.loads, map(_value, messages)))
            rows = list(map(self._required, records))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        return records if set(map(type, map(_first, rows))) <= {dict} else None

    def _parse_each(self, messages: Sequence, out: Output) -> tuple[list[dict], list]:
        """The readable records and their messages; each unreadable one goes to the DLQ with why."""
        required = ("event_id", self.spec.key, "event_time")
        records, kept = [], []
        for msg in messages:
            try:
                record = orjson.loads(msg.value())
                if type(record["features"]) is not dict:
                    raise TypeError("its features are not an object")
                for name in required:
                    record[name]  # noqa: B018 - a record without its id, key or time is refused
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                letter = dead_letter(self.spec.topics.dlq, msg, f"unreadable features record: {exc}", STAGE)
                out.produce(letter.topic, letter.value, letter.key, headers=letter.headers)
                self.bad_records += 1
                self.refusals["unreadable_features"] += 1
                continue
            records.append(record)
            kept.append(msg)
        return records, kept

    def _emit(self, version: str | None, role: str, topic: str, kept: list, records: list[dict], scores: np.ndarray,
              out: Output) -> None:
        """One prediction per record to `topic` (prediction(), or splice_predictions() where it gives the
        same bytes).

        A score is written as its float32's shortest text (null when not finite), all of a batch's in
        one call: float64 repr, 17 digits of which 8 are noise, cost more than the rest of a record."""
        version = version or ""
        scored_at = iso_ms(int(time.time() * 1000))
        texts = orjson.dumps(np.asarray(scores, dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
        values = list(map(_value, kept))
        produce = out.produce
        if splice_applies(values, records):
            built = splice_predictions(values, texts, version, scored_at, role)
        else:
            built = [prediction(record, text, version, scored_at, role)
                     for record, text in zip(records, texts, strict=True)]
        for value, key in zip(built, map(_key, kept), strict=True):
            produce(topic, value, key)

    def _histories(self, messages: list, records: list[dict]) -> tuple[list[list[dict]], dict]:
        """Each record's entity history from Redis (rows older than it) with itself last, built once for
        every model the batch calls, and the histories to write back after (late records not added)."""
        assert self.history is not None
        keep = self.config.history
        key_field = self.spec.key
        stored = self.history.get_many([r[key_field] for r in records])
        sequences = []
        position = self.position
        for msg, record in zip(messages, records, strict=True):
            entity = record[key_field]
            rows = stored[entity]
            partition, offset = position(msg)
            before = history_before(rows, partition, offset)
            sequences.append([r[2] for r in before[-(keep - 1):]] + [record["features"]])
            if not record.get("late"):
                stored[entity] = append_once(rows, partition, offset, record["features"], keep)
        return sequences, stored


def features_position(msg) -> tuple[int | str, int]:
    """A features record's partition and offset, tagging the history rows it adds."""
    return msg.partition(), msg.offset()


def source_position(msg) -> tuple[int | str, int]:
    """A record held in memory by the fused stage, at its source record's offset: the partition as
    "source/N", so history rows of the split stages (features offsets) and of the fused one never
    compare (all of one are older than all of the other, whichever ran first)."""
    return f"source/{msg.partition()}", msg.offset()


def drift_window(model: LoadedModel, rows: int) -> DriftWindow | None:
    """The live window of a model whose manifest records a reference (a retrained one; the baseline
    has none), None otherwise or when rows is 0."""
    manifest = model.manifest
    ref = manifest.reference if isinstance(manifest, Manifest) else None
    if ref is None or rows <= 0 or model.version is None:
        return None
    return DriftWindow(ref, model.normaliser.names, model.version, rows)


def report_drift(scorer: Scorer, client, replica: int, metrics: StageMetrics | None) -> None:
    """The serving version's window to Redis (for `eddy drift`, gold.drift and retraining) and, as
    PSI and null shares, to the metrics."""
    window = scorer.drift
    if window is None:
        return
    snapshot = window.snapshot()
    publish_snapshot(client, scorer.spec.name, replica, snapshot)
    if metrics is not None:
        metrics.drift(measures(snapshot))


def prediction(record: dict, score_text: bytes, version: str, scored_at: str, role: str = "champion") -> bytes:
    """A prediction (docs/contract.md): the features record's own fields behind score (its text as
    given), model_version, role (champion, canary or shadow) and scored_at, which replace any fields of
    the record with those names."""
    return orjson.dumps({"score": orjson.Fragment(score_text), "model_version": version, "role": role,
                         "scored_at": scored_at, **{k: v for k, v in record.items() if k not in _PREDICTION_FIELDS}})


def splice_applies(values: list[bytes], records: list[dict]) -> bool:
    """True when every record is a JSON object as eddy's engines write it (compact, no field of the
    prediction's own): then splice_predictions() gives prediction()'s bytes without re-serialising."""
    return (all(map(bytes.startswith, values, repeat(b"{")))
            and all(map(_PREDICTION_FIELDS.isdisjoint, records))
            and not any(map(bytes.startswith, values, repeat(b"{}"))))


def splice_predictions(values: list[bytes], score_texts: list[bytes], version: str, scored_at: str,
                       role: str = "champion") -> list[bytes]:
    """prediction() for a batch of compact features records, by putting score, model_version, role and
    scored_at in front of each record's own bytes (in C: no per-record Python)."""
    head = b',"model_version":%s,"role":%s,"scored_at":"%s",' % (orjson.dumps(version), orjson.dumps(role),
                                                                 scored_at.encode())
    splice = b'{"score":%b' + head.replace(b"%", b"%%") + b"%b"
    return list(map(splice.__mod__, zip(score_texts, map(_tail, values), strict=True)))


def export_counts(scorer: Scorer, metrics: StageMetrics) -> None:
    """The scorer's counts into its stage's metrics (predictions out, updates refused, the serving
    version); its dead letters by reason are the caller's to add (the fused stage adds the engine's)."""
    spec, counters, serving = scorer.spec, scorer.listener.counters, scorer.serving
    metrics.total(metrics.records_out.labels(spec.name, STAGE, spec.topics.predictions), scorer.rows)
    metrics.total(metrics.updates_refused.labels(spec.name, STAGE, "verification"), counters.refused)
    metrics.total(metrics.updates_refused.labels(spec.name, STAGE, "replayed"), counters.replayed)
    if serving is not None:
        metrics.serving(serving.version or "", str(scorer.device))


def beat_fields(scorer: Scorer) -> dict[str, Any]:
    """What a scorer's heartbeat carries besides its record count (`eddy status`, the rollout judge)."""
    serving, counters = scorer.serving, scorer.listener.counters
    return dict(device=str(scorer.device), guarantee=scorer.spec.guarantee, model_version=serving.version if serving is not None else None,
                batch_size=round(scorer.rows / max(scorer.batches, 1), 1),
                updates_accepted=counters.accepted, updates_refused=counters.refused,
                updates_ignored=counters.ignored_older, updates_replayed=counters.replayed,
                last_refusal=counters.last_refusal or None, bad_records=scorer.bad_records,
                rollout=scorer.route.to_dict() if scorer.route is not None else None,
                challenger=scorer.challenger.version if scorer.challenger is not None else None,
                by_version={v: dict(c) for v, c in list(scorer.by_version.items())})


def run_scorer(config: ScorerConfig, metrics: StageMetrics | None = None) -> None:
    """Run one scorer replica in this process until SIGTERM (with `metrics`, exported as it goes)."""
    import torch

    torch.set_num_threads(1)  # one scorer replica per core; more threads only contend on small batches
    client = redis_client(config.redis_url)
    scorer = Scorer(config, client)
    scorer.metrics = metrics
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    heartbeat = Heartbeat(client, config.spec.name, STAGE)
    scorer.listener.start()
    loop = loop_for(config.spec.guarantee, config.kafka, config.group, [config.spec.topics.features],
                    transactional_id=f"{config.group}-{config.replica}",
                    batch_size=config.batch_size, batch_wait_s=config.batch_wait_s,
                    min_interval_s=config.commit_interval_s, metrics=metrics)

    def beat(force: bool = False) -> None:
        if metrics is not None:
            export_counts(scorer, metrics)
            metrics.refusals(scorer.refusals)
        heartbeat.beat(scorer.rows, force=force, **beat_fields(scorer), **loop.stats.summary())

    scorer.wait_for_model()

    def beat_every_second() -> None:  # also while idle, so status shows the replica as alive
        ticks = 0
        while not stop.wait(1.0):
            beat(force=True)
            ticks += 1
            if ticks % DRIFT_EVERY_S == 0:
                try:
                    report_drift(scorer, client, config.replica, metrics)
                except RedisError as exc:  # reported again next time
                    log.warning("drift not reported: %s", exc)

    threading.Thread(target=beat_every_second, name="heartbeat", daemon=True).start()
    beat(force=True)
    try:
        loop.run(scorer, stop.is_set, on_idle=scorer.swap_if_ready)  # an idle scorer swaps too: status tells the truth
    finally:
        scorer.listener.stop()
        beat(force=True)
