"""Model updates over Kafka: signed messages naming an artifact; scorers verify, load, warm up, swap.

A message is `{"version", "uri", "sha256", "signature", "created_at", "metrics", "spec_hash", "action"}`
(docs/contract.md, "model-updates", with `action`: publish, promote or rollback, which change the version
that serves, or rollout and rollout_end, which carry a rollout's state in a `rollout` field: models.rollout),
and `seq`, its place in the topic's order. Nothing in it is trusted before its Ed25519 signature checks
against a trusted key (models.signing); a message whose `seq` is not above the last one taken (a replay,
a duplicate) changes nothing; the artifact is then checked again (sha256, signature, safetensors) by
load_artifact before any weight is parsed."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from features.errors import EddyError
from features.spec import PipelineSpec
from features.waiting import poll
from models.artifacts import load_artifact, model_update_message, next_sequence, sign_message, verify_message
from models.errors import UpdateRefused
from models.groups import SEQUENCE_GROUP_PREFIX
from models.manifest import Manifest
from models.signing import SigningKey, TrustedKeys
from models.store import Artifacts, ObjectStore, fetched
from streams.kafka import KafkaConfig, consumed

if TYPE_CHECKING:
    from models.scoring import LoadedModel

log = logging.getLogger(__name__)
SERVING_ACTIONS = ("publish", "promote", "rollback")
ROLLOUT_ACTIONS = ("rollout", "rollout_end")
ACTIONS = SERVING_ACTIONS + ROLLOUT_ACTIONS

# Groups of readers that never commit: the publisher reading the topic's tail, `eddy retrain` reading
# labels and features from Kafka (deploy.access grants the publisher these prefixes).

def serves(message: dict) -> bool:
    """Whether the message is about which version serves (not a rollout's state)."""
    return message.get("action", "publish") in SERVING_ACTIONS


def _rollout_state(message: dict) -> bool:
    state = message.get("rollout")
    return isinstance(state, dict) and all(k in state for k in ("id", "champion", "step", "steps", "started_at",
                                                                 "step_started_at"))


def supersedes(message: dict, current: dict | None) -> bool:
    """Whether `message` serves after `current`: a publish must be newer than what serves; promote and
    rollback are explicit and always win."""
    if current is None or message.get("action", "publish") != "publish":
        return True
    return str(message["created_at"]) > str(current["created_at"])


def read_updates(kafka: KafkaConfig, spec: PipelineSpec, key: TrustedKeys, store: ObjectStore | None = None) -> list[dict]:
    """Every validly signed update for this spec whose artifact verifies, in topic order (a snapshot);
    `store`: where s3:// artifacts are fetched from."""
    consumer = Consumer(kafka.client(**{"group.id": f"{spec.stage_id('registry')}-{uuid.uuid4().hex[:8]}",
                                        "enable.auto.commit": False, "isolation.level": "read_committed"}))
    topic = spec.topics.model_updates
    try:
        partitions = list(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        behind = {p for p, end in ends.items() if end > 0}
        out: list[dict] = []

        def read_batch() -> bool:
            """One batch of the topic into `out`; True once every partition was read to its end."""
            for msg in consumed(consumer.consume(500, 0.5)):
                if msg.error() is not None:
                    continue
                if msg.offset() + 1 >= ends[msg.partition()]:
                    behind.discard(msg.partition())
                value = msg.value()
                if value is None:  # a tombstone: no update
                    continue
                try:
                    message = orjson.loads(value)
                    fields = {k: v for k, v in message.items() if k != "signature"}
                    if (verify_message(fields, message["signature"], key) and message.get("spec_hash") == spec.spec_hash
                            and _in_order(message, out[-1] if out else None) and _servable(message, spec, key, store)):
                        out.append(message)
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue
            return not behind

        if behind:
            poll(read_batch, 60, every_s=0)  # past the deadline: what was read by then
        return out
    finally:
        consumer.close()


def _in_order(message: dict, last: dict | None) -> bool:
    """Whether the message's seq is above the last taken one's (what a scorer takes)."""
    seq = message.get("seq")
    return isinstance(seq, int) and not isinstance(seq, bool) and (last is None or seq > last["seq"])


def _servable(message: dict, spec: PipelineSpec, key: TrustedKeys, store: ObjectStore | None) -> bool:
    """Whether a scorer would load this update's artifact (what a scorer refuses never served)."""
    from models.artifacts import verify_artifact

    try:
        with fetched(message["uri"], store) as directory:
            manifest = verify_artifact(directory, key, spec.spec_hash, list(spec.model_inputs))
    except (EddyError, OSError):
        return False
    return manifest.sha256 == message.get("sha256")


def serving_update(updates: list[dict]) -> dict | None:
    """Which of the updates (topic order) serves now, by the rule scorers apply."""
    current = None
    for message in updates:
        if serves(message) and supersedes(message, current):
            current = message
    return current


def update_message(manifest, uri: str, key: SigningKey, action: str = "publish") -> dict:
    """The signed model-updates message for an artifact already saved at uri."""
    if action not in ACTIONS:
        raise ValueError(f"action {action!r} is not one of {ACTIONS}")
    return model_update_message(manifest, uri, key, action)


def publish(kafka: KafkaConfig, topic: str, manifest, uri: str, key: SigningKey, action: str = "publish") -> None:
    """Publish a signed update for the artifact at `uri` (already saved there); EddyError when the
    broker does not acknowledge it within 30 s."""
    publish_messages(kafka, topic, [update_message(manifest, uri, key, action)], key, manifest.version)


def publish_messages(kafka: KafkaConfig, topic: str, messages: list[dict], key: SigningKey, what: str) -> None:
    """Produce model-updates messages in order, each signed with its `seq`: above the newest trusted
    message's on the topic and above the time in microseconds, so it is taken even when this host's
    clock is behind the last publisher's. EddyError when the broker does not acknowledge within 30 s."""
    last = last_sequence(kafka, topic, key)
    producer = Producer(kafka.client(**{"enable.idempotence": True}))
    for message in messages:
        fields = {k: v for k, v in message.items() if k != "signature"} | {"seq": next_sequence(after=last)}
        producer.produce(topic, orjson.dumps({**fields, "signature": sign_message(fields, key)}))
    if producer.flush(30) != 0:
        raise EddyError(f"could not publish {what} to {topic!r}: the broker did not acknowledge")


def last_sequence(kafka: KafkaConfig, topic: str, trusted: TrustedKeys, tail: int = 20) -> int:
    """The highest seq among the last `tail` records of each partition that a trusted key signed (0 if none)."""
    consumer = Consumer(kafka.client(**{"group.id": f"{SEQUENCE_GROUP_PREFIX}{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                                        "isolation.level": "read_committed"}))
    try:
        partitions = list(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        ranges = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}
        wanted = {p: (max(low, high - tail), high) for p, (low, high) in ranges.items() if high > low}
        consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in wanted.items()])
        best, left = 0, set(wanted)

        def read() -> bool:
            nonlocal best
            for msg in consumed(consumer.consume(100, 0.5)):
                if msg.error() is not None:
                    continue
                if msg.offset() + 1 >= wanted[msg.partition()][1]:
                    left.discard(msg.partition())
                try:
                    message = orjson.loads(msg.value() or b"null")
                    if verify_message(message, message["signature"], trusted) and _in_order(message, None):
                        best = max(best, message["seq"])
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue
            return not left

        if left:
            poll(read, 30, every_s=0)
        return best
    finally:
        consumer.close()


@dataclass
class UpdateCounters:
    """What the listener did with updates since it started, for the scorer's heartbeat."""

    accepted: int = 0
    refused: int = 0
    ignored_older: int = 0
    replayed: int = 0  # signed, but its seq was not above the last taken: a replay or a duplicate
    last_refusal: str = ""
    swap_ms: list[float] = field(default_factory=list)


class UpdateListener:
    """Reads the model-updates topic from the beginning in a thread; each accepted update is loaded,
    warmed up and handed to on_ready(loaded). Refusals are one log line and a counter."""

    def __init__(self, kafka: KafkaConfig, spec: PipelineSpec, key: TrustedKeys, device,
                 on_ready: Callable[[LoadedModel, dict], None], serving: Callable[[], LoadedModel | None],
                 on_rollout: Callable[[dict, LoadedModel | None], None] = lambda message, loaded: None,
                 store: ObjectStore | None = None) -> None:
        self.kafka, self.spec, self.key, self.device, self.store = kafka, spec, key, device, store
        self.on_ready, self.serving, self.on_rollout = on_ready, serving, on_rollout
        self._challenger: str | None = None  # the challenger version last handed to on_rollout
        self._last_seq = 0  # the seq of the last message taken
        self.counters = UpdateCounters()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-updates", daemon=True)
        self.caught_up = threading.Event()

    def start(self) -> None:
        """Start reading the topic in a background thread; `caught_up` is set once its history is
        replayed and the newest servable update in it (if any) handed to on_ready."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the reading thread, waiting up to 10 s for it."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        consumer = Consumer(self.kafka.client(**{
            "group.id": f"{self.spec.stage_id('model-updates')}-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "isolation.level": "read_committed"}))
        topic = self.spec.topics.model_updates
        partitions = list(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        behind = {p for p, end in ends.items() if end > 0}
        history: list[dict] = []  # what served, in order, while replaying the topic at start
        rollout: dict | None = None  # the rollout in progress at the end of the replay
        if not behind:
            self.caught_up.set()
        try:
            while not self._stop.is_set():
                for msg in consumed(consumer.consume(100, 0.2)):
                    if msg.error() is not None:
                        continue
                    if self.caught_up.is_set():
                        self._apply(msg.value())
                        continue
                    message = self._check(msg.value())
                    if message is not None and not serves(message):
                        rollout = message if message["action"] == "rollout" else None
                    elif message is not None and supersedes(message, history[-1] if history else None):
                        history.append(message)
                    if msg.offset() + 1 >= ends[msg.partition()]:
                        behind.discard(msg.partition())
                    if not behind:
                        self._serve_latest(history)
                        if rollout is not None:
                            self._apply_rollout(rollout)
                        self.caught_up.set()
        finally:
            consumer.close()

    def _serve_latest(self, history: list[dict]) -> None:
        """Load the newest servable update of the replayed history; an artifact that fails falls back."""
        for message in reversed(history):
            if self._load(message):
                return

    def _check(self, raw: bytes | None) -> dict | None:
        """The verified message, or None (refused: counted and logged once)."""
        try:
            if raw is None:
                raise UpdateRefused("an empty record (a tombstone), not a signed model update")
            message = orjson.loads(raw)
            if not isinstance(message, dict) or "signature" not in message:
                raise UpdateRefused("not a signed model update")
            fields = {k: v for k, v in message.items() if k != "signature"}
            if not verify_message(fields, message["signature"], self.key):
                raise UpdateRefused(f"bad signature on update {str(message.get('version'))[:40]!r}")
            if message.get("spec_hash") != self.spec.spec_hash:
                raise UpdateRefused(f"update {message['version']!r} is for another spec")
            if message.get("action", "publish") not in ACTIONS:
                raise UpdateRefused(f"update {message['version']!r} has unknown action {message['action']!r}")
            if not serves(message) and not _rollout_state(message):
                raise UpdateRefused(f"update {message['version']!r}: a {message['action']} without its rollout state")
            if not _in_order(message, None):
                raise UpdateRefused(f"update {message['version']!r} has no sequence number")
            if message["seq"] <= self._last_seq:
                self.counters.replayed += 1
                log.warning("model update %s (%s, seq %d) ignored: not after the last one taken (seq %d): "
                            "a replay or a duplicate", message["version"], message.get("action", "publish"),
                            message["seq"], self._last_seq)
                return None
            self._last_seq = message["seq"]
            return message
        except (UpdateRefused, orjson.JSONDecodeError) as exc:
            self._refuse(str(exc))
            return None

    def _refuse(self, reason: str) -> None:
        self.counters.refused += 1
        self.counters.last_refusal = reason
        log.warning("model update refused: %s", reason)

    def _apply(self, raw: bytes | None) -> None:
        message = self._check(raw)
        if message is None:
            return
        if not serves(message):
            self._apply_rollout(message)
            return
        current = self.serving()
        serving = current.manifest if current is not None else None  # a Manifest: served models are artifacts
        if isinstance(serving, Manifest) and not supersedes(message, {"created_at": serving.created_at}):
            self.counters.ignored_older += 1
            log.info("model update %s ignored: not newer than serving %s", message["version"], serving.version)
            return
        self._load(message)

    def _apply_rollout(self, message: dict) -> None:
        """Hand a rollout's step or end to the scorer: a new challenger is loaded (verified like any
        update) first; the same challenger at another step is handed on without loading."""
        if message["action"] == "rollout_end":
            self._challenger = None
            self.on_rollout(message, None)
            return
        if message["version"] == self._challenger:
            self.on_rollout(message, None)
            return
        loaded = self._verified_load(message)
        if loaded is not None:
            self._challenger = message["version"]
            self.on_rollout(message, loaded)

    def _load(self, message: dict) -> bool:
        loaded = self._verified_load(message)
        if loaded is None:
            return False
        self.on_ready(loaded, message)
        return True

    def _verified_load(self, message: dict) -> LoadedModel | None:
        """The update's artifact loaded and warmed up (message["load_ms"] set), or None (refused)."""
        started = time.perf_counter()
        try:
            with fetched(message["uri"], self.store) as directory:
                loaded = load_artifact(directory, self.key, self.spec.spec_hash, list(self.spec.model_inputs), self.device)
            manifest = loaded.manifest  # load_artifact always sets a Manifest
            if not isinstance(manifest, Manifest) or manifest.sha256 != message["sha256"]:
                raise UpdateRefused(f"update {message['version']!r}: artifact sha256 differs from the message")
            loaded.warm_up()
        except EddyError as exc:
            self._refuse(f"update {message.get('version')!r}: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - no bad artifact may stop the scorer
            self._refuse(f"update {message.get('version')!r}: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        self.counters.accepted += 1
        message["load_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return loaded


def ensure_baseline(kafka: KafkaConfig, spec: PipelineSpec, artifacts: Artifacts, key: SigningKey) -> str | None:
    """On a stack where no model was ever published, save and publish the baseline so predictions
    flow from the first event; returns its version, or None when the topic already has updates."""
    from confluent_kafka import Consumer

    from models.baseline import baseline_artifact

    topic = spec.topics.model_updates
    probe = Consumer(kafka.client(**{"group.id": spec.stage_id("probe"), "enable.auto.commit": False}))
    failures: list[KafkaException] = []

    def end_offsets() -> list[int] | None:
        """The topic's end offsets; None while the broker cannot say (a topic created a moment ago
        may not have a leader yet)."""
        try:
            partitions = probe.list_topics(topic, timeout=15).topics[topic].partitions
            return [probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions]
        except KafkaException as exc:
            failures.append(exc)
            return None

    try:
        ends = poll(end_offsets, 30, every_s=0.5)
        if ends is None:
            raise failures[-1]  # still no answer at the deadline: the broker's own error
        if any(end > 0 for end in ends):
            return None
    finally:
        probe.close()
    directory = artifacts.directory(spec.name, "baseline-1")
    manifest = baseline_artifact(spec, directory, key, version="baseline-1")
    publish(kafka, topic, manifest, artifacts.publish(directory), key, action="publish")
    return manifest.version
