"""The Faust feature engine: an agent per source partition over the shared front door and Featurizer.

Entity state lives in a Faust table (changelog in Kafka) and the app runs with exactly-once processing,
so outputs, DLQ records, state changes and offsets commit together; a killed worker loses nothing."""

from __future__ import annotations

import logging

from streams.dedupe import Deduper
from streams.engines.config import STAGE, EngineConfig
from streams.featurize import Featurizer
from streams.frontdoor import FrontDoor
from streams.kafka import KafkaConfig
from streams.metrics import Heartbeat

log = logging.getLogger(__name__)


class _Message:
    """A Faust message seen through the confluent-kafka Message methods the front door uses."""

    __slots__ = ("_m",)

    def __init__(self, message) -> None:
        self._m = message

    def key(self):
        return self._m.key

    def value(self):
        return self._m.value

    def topic(self):
        return self._m.topic

    def partition(self):
        return self._m.partition

    def offset(self):
        return self._m.offset

    def headers(self):
        headers = self._m.headers
        return list(headers.items()) if isinstance(headers, dict) else list(headers or [])


class _Collect:
    """Collects what the front door produces (dead letters) so the agent can send them in its transaction."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes | None, bytes | None, list]] = []

    def produce(self, topic, value, key=None, headers=None) -> None:
        self.items.append((topic, key, value, headers or []))


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
                               mechanism=props.get("sasl.mechanism", "PLAIN"), ssl_context=context)
    return SSLCredentials(context)


def build_app(config: EngineConfig):
    import faust
    import redis

    spec = config.spec
    app = faust.App(
        config.app_id,
        broker=[f"kafka://{host}:{port}" for host, port in config.kafka.hosts],
        broker_credentials=_credentials(config.kafka),
        store="memory://",
        processing_guarantee="exactly_once",
        topic_partitions=config.partitions,
        broker_commit_interval=config.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        datadir=str(config.data_dir),
        key_serializer="raw",
        value_serializer="raw",
    )
    source = app.topic(spec.topics.source, key_type=bytes, value_type=bytes, partitions=config.partitions)
    features = app.topic(spec.topics.features, key_type=bytes, value_type=bytes)
    dlq = app.topic(spec.topics.dlq, key_type=bytes, value_type=bytes)
    states = app.Table("entity-state", default=None, partitions=config.partitions,
                       key_type=bytes, value_type=bytes)
    door = FrontDoor(spec, Deduper(redis.Redis.from_url(config.redis_url), spec.name), stage=STAGE)
    featurize = Featurizer(spec)

    # One actor per partition. State, output and dead letters of an event are written to that event's
    # partition explicitly, so all of them join the transaction that commits its source offset.
    @app.agent(source, name="compute", isolated_partitions=True)
    async def compute(stream):
        store = states.data
        async for batch in stream.take_events(config.batch_size, within=config.batch_wait_s):
            sink = _Collect()
            for msg, ev in door.admit([_Message(e.message) for e in batch], sink):
                partition = msg.partition()
                key = ev.key.encode()
                new_state, value = featurize.apply(store.get(key), ev)
                if new_state is not None:
                    store[key] = new_state
                    states.send_changelog(partition, key, new_state)
                await features.send(key=key, value=value, partition=partition)
            for _topic, key, value, headers in sink.items:
                await dlq.send(key=key, value=value, headers=headers, partition=batch[0].message.partition)

    heartbeat = Heartbeat(redis.Redis.from_url(config.redis_url), spec.name, "features")

    @app.timer(1.0)
    async def report() -> None:
        counts = door.counts
        heartbeat.beat(counts.valid + counts.invalid + counts.duplicates, force=True, engine="faust",
                       valid=counts.valid, dlq=counts.invalid, duplicates=counts.duplicates)

    return app


def run_worker(config: EngineConfig, loglevel: str = "info") -> None:
    """Run the Faust worker in this process until SIGTERM."""
    import faust

    app = build_app(config)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False, override_logging=False)
    worker.execute_from_commandline()
