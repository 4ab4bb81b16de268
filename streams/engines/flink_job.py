"""The Flink feature engine: source topic (raw bytes) -> key by entity -> validate, dedupe and Featurizer over
keyed state (flink_functions.Featurize) -> features and DLQ topics, exactly-once through Kafka transactions
that commit with Flink's checkpoints. `run_job` runs it on PyFlink's local mini-cluster.

On a cluster the job is submitted through deploy.flink_main (see docs/operations.md); the cluster's
configuration then supplies parallelism, state backend and checkpoint storage."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from streams.engines.config import EngineConfig
from streams.kafka import java_client_properties

REPO_ROOT = Path(__file__).resolve().parents[2]
MIN_CHECKPOINT_INTERVAL_S = 1.0
# Kafka transactions must outlive a restart from the last checkpoint: the broker's default maximum.
TRANSACTION_TIMEOUT_MS = 15 * 60 * 1000
# The SQL connector relocates the Kafka client under this package (its SCRAM login module with it).
SHADED = "org.apache.flink.kafka.shaded."
PYTHON_MODE = "thread"
STATE_BACKEND = "hashmap"
SOURCE, TICKS, FEATURES, DLQ = "eddy_source", "eddy_ticks", "eddy_features", "eddy_dlq"
TICK_KEYS, TICK_PREFIX = 128, "~tick-"  # as many as the default max parallelism's key groups
# The source table's columns; flink_functions reads (K, V, TOPIC, PARTITION, OFFSET, HEADERS, ARRIVAL).
SOURCE_COLUMNS = """
    k BYTES,
    v BYTES,
    `topic` STRING METADATA VIRTUAL,
    `partition` INT METADATA VIRTUAL,
    `offset` BIGINT METADATA VIRTUAL,
    `headers` MAP<STRING, BYTES> METADATA VIRTUAL,
    `ts` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL"""
# The record's Kafka timestamp as epoch ms (Flink SQL has no direct cast from TIMESTAMP_LTZ to ms).
ARRIVAL_MS = ("CAST(TIMESTAMPDIFF(SECOND, TO_TIMESTAMP_LTZ(0, 3), ts) AS BIGINT) * 1000"
              " + MOD(EXTRACT(MILLISECOND FROM ts), 1000)")
_RAW_KEY_VALUE = {"key.format": "raw", "key.fields": "k", "value.format": "raw",
                  "value.fields-include": "EXCEPT_KEY"}


def _with(options: Mapping[str, str]) -> str:
    return ",\n".join(f"  '{_sql(k)}' = '{_sql(v)}'" for k, v in options.items())


def _sql(text: str) -> str:
    return str(text).replace("'", "''")


def _kafka_options(config: EngineConfig, topic: str) -> dict[str, str]:
    props = {f"properties.{k}": v for k, v in java_client_properties(config.kafka, shaded=SHADED).items()}
    return {"connector": "kafka", "topic": topic, "properties.bootstrap.servers": config.kafka.bootstrap,
            **props, **_RAW_KEY_VALUE}


def table_ddl(config: EngineConfig) -> list[str]:
    """CREATE TABLE statements for the source and the two sinks."""
    spec, app_id = config.spec, config.app_id
    source = {**_kafka_options(config, spec.topics.source),
              "properties.group.id": app_id,  # offsets are committed on checkpoints, so lag shows progress
              "properties.isolation.level": "read_committed",
              "properties.auto.offset.reset": "earliest",
              "scan.startup.mode": "group-offsets"}
    if config.bounded:
        source["scan.bounded.mode"] = "latest-offset"

    def sink(topic: str, role: str) -> dict[str, str]:
        return {**_kafka_options(config, topic),
                "sink.delivery-guarantee": "exactly-once",
                "sink.transactional-id-prefix": f"{app_id}-{role}",
                # POOLING reuses a few transactional ids instead of one per checkpoint and subtask
                "sink.transaction-naming-strategy": "POOLING",
                "properties.transaction.timeout.ms": str(TRANSACTION_TIMEOUT_MS)}

    # Rows that start Featurize's heartbeat timers, so an idle job reports itself too. They are a source of
    # their own (not a timer set in open()) because keyed timers need a key; TICK_KEYS keys of their own, so
    # that every subtask holds some (key groups are spread by hash) and each subtask beats.
    ticks = {"connector": "datagen", "fields.n.kind": "sequence", "fields.n.start": "0",
             "fields.n.end": str(TICK_KEYS - 1)}
    return [
        f"CREATE TEMPORARY TABLE {SOURCE} ({SOURCE_COLUMNS}\n) WITH (\n{_with(source)}\n)",
        f"CREATE TEMPORARY TABLE {TICKS} (n INT) WITH (\n{_with(ticks)}\n)",
        f"CREATE TEMPORARY TABLE {FEATURES} (k BYTES, v BYTES) WITH (\n{_with(sink(spec.topics.features, 'features'))}\n)",
        f"CREATE TEMPORARY TABLE {DLQ} (k BYTES, v BYTES, `headers` MAP<STRING, BYTES> METADATA)"
        f" WITH (\n{_with(sink(spec.topics.dlq, 'dlq'))}\n)",
    ]


def checkpoint_dir(config: EngineConfig) -> Path:
    """Where checkpoints go. Bounded runs keep theirs apart: a restored split keeps the stopping offset it
    was read with, so a bounded run resumes only an interrupted bounded run (and a finished one leaves none)."""
    return config.data_dir / ("checkpoints-bounded" if config.bounded else "checkpoints")


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (a chk-N holding _metadata) of any earlier run under root."""
    done = sorted(root.glob("*/chk-*/_metadata"), key=lambda p: p.stat().st_mtime_ns)
    return done[-1].parent if done else None


def _forget_other_runs(root: Path, keep: Path | None) -> None:
    """Remove the directories of earlier runs except the one restored from (Flink claims that one)."""
    for run in root.glob("*"):
        if run.is_dir() and (keep is None or run != keep.parent):
            shutil.rmtree(run, ignore_errors=True)


def connector_jars(config: EngineConfig, required: bool = True) -> list[str]:
    """file:// URLs of the Kafka SQL connector (kafka-clients shaded in) for pipeline.jars."""
    from features.errors import ConfigError

    folder = (config.jars_dir or REPO_ROOT / ".jars") / "flink"
    jars = sorted(folder.glob("flink-sql-connector-kafka-*.jar"))
    if not jars and required:
        raise ConfigError(f"no flink-sql-connector-kafka jar in {folder}; run `make demo` or deploy/setup.sh "
                          "to fetch the JVM jars")
    return [jars[-1].resolve().as_uri()] if jars else []


def flink_configuration(config: EngineConfig, cluster: bool = False,
                        checkpoints: str | None = None) -> dict[str, str]:
    """The job's Flink settings. On a cluster, the cluster's own configuration supplies the Python
    executable, parallelism, state backend, checkpoint storage (unless given) and the restore path."""
    interval_ms = int(max(MIN_CHECKPOINT_INTERVAL_S, config.commit_interval_s) * 1000)
    conf = {
        "pipeline.name": config.app_id,
        "execution.checkpointing.interval": f"{interval_ms} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        # Barriers overtake the records queued under backpressure, so a checkpoint (and with it the Kafka
        # transactions and the source offsets) completes about every interval during a backlog too.
        "execution.checkpointing.unaligned.enabled": "true",
        "python.execution-mode": PYTHON_MODE,
        # uids for the planner's operators too (sources, sinks), named from the stage id like Featurize's
        "table.exec.uid.generation": "ALWAYS",
        "table.exec.uid.format": f"{config.app_id}/<id>_<type>_<transformation>",
    }
    if checkpoints:
        conf["execution.checkpointing.dir"] = checkpoints
    if cluster:
        jars = connector_jars(config, required=False)  # else the cluster's lib/ must hold the connector
        return {**conf, "pipeline.jars": ";".join(jars)} if jars else conf
    conf["pipeline.jars"] = ";".join(connector_jars(config))
    root = checkpoint_dir(config)
    root.mkdir(parents=True, exist_ok=True)
    conf.update({
        "execution.checkpointing.dir": checkpoints or root.resolve().as_uri(),
        "state.backend.type": STATE_BACKEND,
        "parallelism.default": "1",  # one TaskManager, one embedded interpreter: more would share its GIL
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        # thread mode embeds CPython in the JVM, which knows nothing of this virtualenv (pemja, eddy)
        "python.pythonpath": os.pathsep.join([sysconfig.get_paths()["purelib"], str(REPO_ROOT)]),
    })
    if config.bounded:
        conf["restart-strategy.type"] = "none"  # a test or backfill reports a failure instead of retrying
    if not checkpoints:
        restore = latest_checkpoint(root)
        _forget_other_runs(root, restore)
        if restore is not None:
            conf["execution.state-recovery.path"] = restore.resolve().as_uri()
            conf["execution.state-recovery.claim-mode"] = "CLAIM"
            # After an upgrade that changed the operators, start anyway: Featurize keeps its state by
            # uid; a source whose offsets are dropped resumes from the group's committed offsets.
            conf["execution.state-recovery.ignore-unclaimed-state"] = "true"
    return conf


def build_job(config: EngineConfig, cluster: bool = False, checkpoints: str | None = None):
    """The StreamExecutionEnvironment with the whole pipeline attached; `.execute()` runs it."""
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    from streams.engines.flink_functions import DLQ_TAG, FEATURE_ROW, Featurize

    conf = Configuration()
    for key, value in flink_configuration(config, cluster, checkpoints).items():
        conf.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)
    for ddl in table_ddl(config):
        t_env.execute_sql(ddl)

    uid = config.app_id
    keyed = _key_by_entity(t_env, config.spec.key)
    features = (keyed
                .process(Featurize(config.spec, config.redis_url, None if cluster else os.getpid()),
                         output_type=FEATURE_ROW)
                .name("featurize").uid(f"{uid}/featurize"))
    dlq = features.get_side_output(DLQ_TAG)

    statements = t_env.create_statement_set()
    statements.add_insert(FEATURES, t_env.from_data_stream(features))
    statements.add_insert(DLQ, t_env.from_data_stream(dlq))
    statements.attach_as_datastream()
    return env


def _key_by_entity(t_env, key_field: str):
    """The source records keyed by their entity key, with no Python operator before the keyed one.

    DataStream.key_by would run a Python key selector in an operator of its own (a second crossing
    into Python per record). Instead SQL reads the key (JSON_VALUE, '' where there is none) and nests
    the record beside it, which is the (key, record) row PyFlink's own key_by builds; the Java
    KeyByKeySelector then keys it, and Featurize receives the record. The tick joins here too."""
    from pyflink.common import Types
    from pyflink.datastream.data_stream import KeyedStream
    from pyflink.java_gateway import get_gateway

    from streams.engines.flink_functions import SOURCE_ROW

    columns = ", ".join(f"`{c}`" for c in ("k", "v", "topic", "partition", "offset", "headers")) + f", {ARRIVAL_MS}"
    nothing = ", ".join(f"CAST(NULL AS {t})" for t in ("BYTES", "BYTES", "STRING", "INT", "BIGINT",
                                                         "MAP<STRING, BYTES>", "BIGINT"))
    pairs = t_env.sql_query(
        f"SELECT COALESCE(JSON_VALUE(CAST(v AS STRING), '$.{key_field}'), '') AS entity, "
        f"ROW({columns}) AS record FROM {SOURCE} "
        f"UNION ALL SELECT CONCAT('{TICK_PREFIX}', CAST(n AS STRING)) AS entity, ROW({nothing}) AS record FROM {TICKS}")
    stream = t_env.to_append_stream(pairs, Types.ROW([Types.STRING(), SOURCE_ROW]))
    j_keyed = stream._j_data_stream.keyBy(get_gateway().jvm.KeyByKeySelector(),
                                          Types.ROW([Types.STRING()]).get_java_type_info())
    return KeyedStream(j_keyed, None, stream)


def run_job(config: EngineConfig) -> None:
    """Run on the local mini-cluster until stopped; with config.bounded, until the source's end offsets."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    build_job(config).execute(config.app_id)
