"""Kafka client configuration and the small helpers every eddy process shares: clients, topics, lag."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, cast

from features.errors import ConfigError, ServiceError

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message

_CLIENT_LOG = logging.getLogger("eddy.kafka.client")
_NUMBERS = re.compile(r"\d+")


class Repeats(logging.Filter):
    """At most one record per kind a `every_s`, the kind being the message with its numbers taken out; the
    next one of a kind says how many like it were held back. While a broker is away, librdkafka reports
    each failed reconnect of each client, every 50 ms: a 13 s outage wrote 627 lines into one stage's log."""

    def __init__(self, every_s: float = 10.0, clock=time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # kind -> (when one was last let through, held since)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        kind = _NUMBERS.sub("#", message)
        now = self.clock()
        last, held = self._seen.get(kind, (float("-inf"), 0))
        if now - last < self.every_s:
            self._seen[kind] = (last, held + 1)
            return False
        if len(self._seen) > 1000:  # kinds are few; a bound all the same
            self._seen.clear()
        self._seen[kind] = (now, 0)
        if held:
            record.msg, record.args = f"{message} ({held} more like it in the last {now - last:.0f}s)", ()
        return True


_CLIENT_LOG.addFilter(Repeats())
_SECRET_MARKERS = ("password", "secret", "jaas", "token", "key.password", "sasl.oauthbearer", "key.pem",
                   "keystore.key")


def is_secret_key(name: str) -> bool:
    """True for client settings whose values must never be printed or logged."""
    lowered = name.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


def parse_properties(text: str, source: str = "<properties>") -> dict[str, str]:
    """Parse a Java-style properties file (key=value or key: value, # and ! comments)."""
    props: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        sep = min((i for i in (line.find("="), line.find(":")) if i > 0), default=-1)
        if sep < 0:
            raise ConfigError(f"{source}:{number}: expected 'key=value', got {line[:40]!r}")
        props[line[:sep].strip()] = line[sep + 1 :].strip()
    return props


def check_client_security(props: Mapping[str, str], allow_unverified_tls: bool, source: str) -> None:
    """ConfigError for client settings that would trust any broker or send a password in clear."""
    if props.get("enable.ssl.certificate.verification", "true").strip().lower() in ("false", "0", "no", "off") \
            and not allow_unverified_tls:
        raise ConfigError(f"{source}: enable.ssl.certificate.verification=false trusts any broker certificate; "
                          "remove it, or set EDDY_KAFKA_UNVERIFIED_TLS=on to accept that")
    mechanism = (props.get("sasl.mechanisms") or props.get("sasl.mechanism") or "").upper()
    if props.get("security.protocol", "").upper() == "SASL_PLAINTEXT" and mechanism == "PLAIN":
        raise ConfigError(f"{source}: SASL PLAIN over SASL_PLAINTEXT sends the password in clear; "
                          "use security.protocol=SASL_SSL (or a SCRAM mechanism)")


@dataclass(frozen=True)
class KafkaConfig:
    """Where the brokers are and the client settings (security.protocol, sasl.*, ssl.*) for every client."""

    bootstrap: str
    properties: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "properties", MappingProxyType(dict(self.properties)))
        self.hosts  # noqa: B018 - validates the form at construction

    def __repr__(self) -> str:
        shown = {k: ("***" if is_secret_key(k) else v) for k, v in self.properties.items()}
        return f"KafkaConfig(bootstrap={self.bootstrap!r}, properties={shown})"

    def client(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka settings for confluent-kafka: the shared ones plus this client's own."""
        # librdkafka's own log lines go to this process's log file, not the terminal.
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "logger": _CLIENT_LOG, **self.properties}
        conf.update(overrides)
        return conf

    @property
    def hosts(self) -> list[tuple[str, int]]:
        """(host, port) of each bootstrap server; ConfigError when one is not host:port (so a
        KafkaConfig that exists has a valid bootstrap: __post_init__ reads this)."""
        out = []
        for part in self.bootstrap.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(
                    f"EDDY_KAFKA_BOOTSTRAP: {part!r} is not host:port; set it like 127.0.0.1:9092"
                )
            out.append((host.strip("[]"), int(port)))
        return out


class Record(Protocol):
    """A consumed Kafka record as the stages read it: confluent-kafka's Message (see consumed()), or a
    stand-in with the same methods (streams.loop.HeldRecord, the Faust engine's message view)."""

    def value(self) -> bytes | None:
        """The record's value; None for a tombstone."""

    def key(self) -> bytes | None:
        """The record's key; None when it has none."""

    def topic(self) -> str:
        """The topic the record was read from."""

    def partition(self) -> int:
        """The partition the record was read from."""

    def offset(self) -> int:
        """The record's offset in its partition."""

    def error(self) -> KafkaError | None:
        """The error this event reports (a partition's end among them); None for a record."""


def consumed(messages: list[Message]) -> list[Record]:
    """What Consumer.consume() returned, typed as Records. The cast is only for the type checker: the
    stubs type a Message's topic, partition and offset as optional, as a message not yet delivered
    lacks them, but a consumed record has them (an error event, when its error is about a partition)."""
    return cast("list[Record]", messages)


def admin(config: KafkaConfig):  # -> confluent_kafka.admin.AdminClient
    """A confluent-kafka AdminClient with the shared client settings; a new client each call."""
    from confluent_kafka.admin import AdminClient

    return AdminClient(config.client())


def wait_for_broker(config: KafkaConfig, timeout_s: float) -> int:
    """Block until the cluster answers a metadata request; returns the broker count."""
    from confluent_kafka import KafkaException

    client = admin(config)
    try:
        metadata = client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise ServiceError(
            f"no Kafka broker answered at {config.bootstrap} within {timeout_s:.0f}s ({exc.args[0]})"
        ) from None
    return len(metadata.brokers)


def ensure_topics(
    config: KafkaConfig, names: Iterable[str], partitions: int, single_partition: Iterable[str] = (),
    configs: Mapping[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet (with topic `configs`, such as cleanup.policy);
    returns the ones created. Idempotent."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    client = admin(config)
    existing = set(client.list_topics(timeout=15).topics)
    single = set(single_partition)
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return []
    new = [NewTopic(n, num_partitions=1 if n in single else partitions, replication_factor=-1,
                    config=dict(configs or {})) for n in wanted]
    created = []
    for name, future in client.create_topics(new, operation_timeout=30).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != exc.args[0].TOPIC_ALREADY_EXISTS:
                raise ServiceError(f"could not create topic {name!r}: {exc.args[0].str()}") from None
    return created


def group_lag(config: KafkaConfig, timeout_s: float = 10.0) -> dict[str, dict[str, int]]:
    """Lag per consumer group and topic: end offset minus committed offset, summed over partitions."""
    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition

    client = admin(config)
    groups = [g.group_id for g in client.list_consumer_groups(request_timeout=timeout_s).result(timeout_s).valid]
    if not groups:
        return {}
    watermarks = Consumer(config.client(**{"group.id": "eddy-status", "enable.auto.commit": False}))
    lags: dict[str, dict[str, int]] = {}
    try:
        for group in sorted(groups):
            futures = client.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
            result = next(iter(futures.values())).result(timeout_s)
            per_topic: dict[str, int] = {}
            for tp in result.topic_partitions:
                if tp.offset < 0:
                    continue
                _, high = watermarks.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout_s)
                per_topic[tp.topic] = per_topic.get(tp.topic, 0) + max(0, high - tp.offset)
            if per_topic:  # groups that never committed (readers such as `eddy consume`) have no lag
                lags[group] = per_topic
    finally:
        watermarks.close()
    return lags


def java_client_properties(kafka: KafkaConfig, shaded: str = "") -> dict[str, str]:
    """The shared client settings (librdkafka names) as the Java client spells them; `shaded` is the
    package prefix of a connector that relocates the Kafka client (its login module's class is renamed)."""
    props = dict(kafka.properties)
    out: dict[str, str] = {}
    mechanism = props.pop("sasl.mechanisms", None) or props.pop("sasl.mechanism", None)
    if mechanism:
        out["sasl.mechanism"] = mechanism
    user, password = props.pop("sasl.username", None), props.pop("sasl.password", None)
    if user is not None and "sasl.jaas.config" not in props:
        module = shaded + ("org.apache.kafka.common.security.scram.ScramLoginModule"
                           if (mechanism or "").upper().startswith("SCRAM") else
                           "org.apache.kafka.common.security.plain.PlainLoginModule")
        out["sasl.jaas.config"] = f'{module} required username="{_jaas(user)}" password="{_jaas(password or "")}";'
    ca = props.pop("ssl.ca.location", None)
    if ca:
        out.update({"ssl.truststore.type": "PEM", "ssl.truststore.location": ca})
    cert, key = props.pop("ssl.certificate.location", None), props.pop("ssl.key.location", None)
    if cert and key:  # a PEM key store given inline: the Java client reads no separate PEM files
        out.update({"ssl.keystore.type": "PEM", "ssl.keystore.certificate.chain": Path(cert).read_text(),
                    "ssl.keystore.key": Path(key).read_text()})
    props.pop("isolation.level", None)  # a consumer's own setting, given per client where it matters
    if props.pop("enable.ssl.certificate.verification", "true").lower() == "false":
        out["ssl.endpoint.identification.algorithm"] = ""
    for name, value in props.items():
        if name == "ssl.endpoint.identification.algorithm" and value == "none":
            value = ""
        out[name] = value
    return out


def _jaas(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def read_topic(config: KafkaConfig, topic: str, quiet_s: float = 3.0, timeout_s: float = 600.0,
               group_prefix: str = "eddy-reader-") -> list[Message]:
    """Every committed record of the topic (read_committed), from the beginning of each partition until
    nothing new has come for `quiet_s`. The partitions are assigned, not subscribed, so no group join
    delays the first record and nothing is committed."""
    import time
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from features.waiting import poll

    consumer = Consumer(config.client(**{"group.id": f"{group_prefix}{uuid.uuid4().hex[:8]}",
                                         "enable.auto.commit": False, "isolation.level": "read_committed"}))
    out: list[Message] = []
    last_new = time.monotonic()

    def quiet() -> bool:
        nonlocal last_new
        got = [msg for msg in consumer.consume(5000, 0.2) if msg.error() is None]
        if got:
            out.extend(got)
            last_new = time.monotonic()
        return time.monotonic() - last_new >= quiet_s

    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        poll(quiet, timeout_s, every_s=0)
    finally:
        consumer.close()
    return out


def json_object(raw: bytes | None) -> dict[str, Any]:
    """The JSON object a record's value holds, or {} for anything else (a poison record is no record)."""
    import orjson

    try:
        value = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def partitions_text(partitions: list) -> str:
    """Partitions as topic[0,1,2] for the log."""
    by_topic: dict[str, list[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return ", ".join(f"{topic}{sorted(numbers)}" for topic, numbers in sorted(by_topic.items())) or "none"
