"""The peer engines of `eddy bench --peers`, one per process: `python -m deploy.peer_jobs quix|bytewax JOB.json`.

Each runs eddy's own per-event step (the front door's validation, then Featurizer.apply_bytes on the entity's
state bytes) inside the peer's keyed state, so only the engine around it differs from eddy's. It runs in the
peers' own virtualenv (.venv-peers, deploy/peers-requirements.txt: quixstreams cannot share eddy's pins), so
it imports nothing of eddy beyond the feature code and the standard library."""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from features.apply import Refused
from features.spec import load_spec
from features.validation import Invalid, Validator
from streams.featurize import Featurizer

QUIX_DEFAULT_COMMIT_S = 5.0  # quixstreams' own default commit_interval
STATE_KEY = b"features"  # the card's one Quix state entry (bytes: the store's identity serialiser takes keys too)


@dataclass(frozen=True)
class Job:
    """What the bench asks of a peer: where to read and write, as whom, and how it checkpoints."""

    kafka: dict[str, str]  # librdkafka connection properties: bootstrap servers, SASL_SSL credentials, CA
    pipeline: str
    source: str
    sink: str
    group: str  # Quix's consumer group and transactional id prefix
    state_dir: str
    report: str  # where the peer writes its Report when it stops
    commit_interval_s: float = QUIX_DEFAULT_COMMIT_S  # Quix: how often a transaction commits
    snapshot_s: float = 5.0  # Bytewax: the epoch length, at which its recovery store snapshots state


@dataclass
class Report:
    """What only the peer's own process can see: when it took its first and last event (wall clock), so
    the bench does not count a commit interval's wait before the first rows became visible as idle time."""

    first_event_at: float | None = None
    last_event_at: float | None = None
    events: int = 0
    refused: int = 0
    cpu_s: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)


class Step:
    """eddy's per-event work as a peer calls it: the raw record through the same Validator the native
    engine's front door uses, then apply_bytes on the entity's stored state bytes."""

    def __init__(self, pipeline: str) -> None:
        spec = load_spec(pipeline)
        self.validator = Validator(spec)
        self.featurizer = Featurizer(spec)
        self.report = Report()

    def __call__(self, state: bytes | None, raw: bytes | None, arrival: int | None) -> tuple[bytes | None, bytes | None]:
        """(the state bytes to store, None when unchanged; the features value, None when refused)."""
        report = self.report
        report.last_event_at = now = time.time()
        if report.first_event_at is None:
            report.first_event_at = now
        report.events += 1
        event = self.validator.parse(raw)
        if isinstance(event, Invalid):
            report.refused += 1
            return None, None
        new_state, value = self.featurizer.apply_bytes(state, event, arrival)
        if isinstance(value, Refused):
            report.refused += 1
            return None, None
        return new_state, value


def _identity(value: Any) -> Any:
    return value


def run_quix(job: Job, step: Step) -> None:
    """Quix Streams, exactly once, its RocksDB store (with its changelog topic) holding each card's state bytes
    as they are (identity serialisation, not its default JSON); runs until SIGTERM (Quix's own handler)."""
    from quixstreams import Application, State
    from quixstreams.kafka.configuration import ConnectionConfig
    from quixstreams.state.rocksdb import RocksDBOptions

    app = Application(broker_address=ConnectionConfig.from_librdkafka_dict(job.kafka), consumer_group=job.group,
                      auto_offset_reset="earliest", processing_guarantee="exactly-once",
                      commit_interval=job.commit_interval_s, state_dir=job.state_dir, loglevel="WARNING",
                      rocksdb_options=RocksDBOptions(dumps=_identity, loads=_identity))
    source = app.topic(job.source, key_deserializer="bytes", value_deserializer="bytes")
    sink = app.topic(job.sink, key_serializer="bytes", value_serializer="bytes")

    def featurize(value: bytes, _key: bytes, timestamp: int, _headers: Any, state: State) -> bytes | None:
        new_state, row = step(state.get(STATE_KEY), value, timestamp if timestamp >= 0 else None)
        if new_state is not None:
            state.set(STATE_KEY, new_state)
        return row

    sdf = app.dataframe(source).apply(featurize, stateful=True, metadata=True)
    sdf = sdf.filter(lambda row: row is not None).to_topic(sink)
    app.run()  # sdf is tracked by the app itself


def run_bytewax(job: Job, step: Step) -> None:
    """Bytewax, at least once: its Kafka source (tailing, so the fixed load after the backlog reaches it)
    keyed by the record key, stateful_map holding the card's state bytes, its Kafka sink; recovery snapshots
    each epoch. Runs until SIGTERM (main's handler interrupts it)."""
    from datetime import timedelta

    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource, KafkaSourceMessage
    from bytewax.dataflow import Dataflow
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.run import cli_main

    brokers = job.kafka["bootstrap.servers"].split(",")
    extra = {k: v for k, v in job.kafka.items() if k != "bootstrap.servers"}

    def featurize(state: bytes | None, msg: KafkaSourceMessage) -> tuple[bytes | None, bytes | None]:
        kind, ms = msg.timestamp or (0, -1)
        new_state, row = step(state, msg.value, ms if kind and ms >= 0 else None)
        return (state if new_state is None else new_state), row  # stateful_map drops a None state

    flow = Dataflow("eddy-peer")
    records = op.input("source", flow, KafkaSource(brokers, [job.source], tail=True, add_config=extra))
    keyed = op.key_on("card", records, lambda msg: msg.key.decode())
    rows = op.stateful_map("featurize", keyed, featurize)
    out = op.filter_map("rows", rows, lambda kv: None if kv[1] is None else KafkaSinkMessage(kv[0].encode(), kv[1]))
    op.output("sink", out, KafkaSink(brokers, job.sink, add_config=extra))
    db = Path(job.state_dir)
    db.mkdir(parents=True, exist_ok=True)
    init_db_dir(db, 1)
    cli_main(flow, workers_per_process=1, epoch_interval=timedelta(seconds=job.snapshot_s),
             recovery_config=RecoveryConfig(db))


PEERS = {"quix": run_quix, "bytewax": run_bytewax}


def versions() -> dict[str, str]:
    """The peers' packages and the librdkafka under them (not eddy's: .venv-peers pins its own)."""
    from importlib.metadata import version

    import confluent_kafka

    return {**{name: version(name) for name in ("quixstreams", "bytewax", "confluent-kafka")},
            "librdkafka": confluent_kafka.libversion()[0]}


class Stopped(Exception):
    """SIGTERM: the bench has seen every row it waited for."""


def _stop(_signum: int, _frame: Any) -> None:
    raise Stopped


def main(argv: list[str]) -> None:
    kind, job_file = argv
    job = Job(**json.loads(Path(job_file).read_text()))
    step = Step(job.pipeline)
    signal.signal(signal.SIGTERM, _stop)  # Quix replaces it with its own graceful stop; Bytewax raises it
    try:
        PEERS[kind](job, step)
    except Exception as exc:  # Bytewax wraps the signal handler's exception in its own (once or more)
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, Stopped):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        step.report.cpu_s = usage.ru_utime + usage.ru_stime
        step.report.versions = versions()
        Path(job.report).write_text(json.dumps(asdict(step.report)))


if __name__ == "__main__":
    main(sys.argv[1:])
