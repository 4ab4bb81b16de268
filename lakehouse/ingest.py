"""Kafka -> Delta ingestion: one Structured Streaming query per table, from the topic that feeds it.

Exactly once: Spark writes a batch's offset range to the checkpoint before running it and replays
the same range with the same batch id after a crash; Delta's streaming sink commits each batch with
the query's persistent id and the batch id in the same transaction as the data, so a replayed batch
that had already committed is skipped."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from features.errors import ServiceError
from features.spec import PipelineSpec
from lakehouse.tables import PARTITION_COLUMN, Table, ingested_tables, rows_of

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.streaming import StreamingQuery

log = logging.getLogger("eddy.lakehouse.ingest")
QUERY_NAME = "eddy-ingest"


# How Spark and Delta refuse a second writer on one checkpoint, whichever of them notices first: Delta's
# commit (the query id and batch id are its transaction), the checkpoint's offsets or commit log (the
# batch's file exists), or the log's rename racing the other writer's.
CONCURRENT_WRITER_MARKS = ("DELTA_CONCURRENT_TRANSACTION", "CONCURRENT_STREAM_LOG_UPDATE",
                           "Multiple streaming queries are concurrently using")
CONCURRENT_WRITER = "another writer with the same checkpoint committed this batch first"


def failure_reason(message: str) -> str:
    """Spark's reason for a stopped query in one line, naming a concurrent writer when it was one."""
    line = first_line(message)
    if any(mark in message for mark in CONCURRENT_WRITER_MARKS):
        return f"{CONCURRENT_WRITER} ({line})"
    return line


@dataclass(frozen=True)
class IngestConfig:
    """How ingestion runs: the lakehouse root, how to reach Kafka, the trigger, the largest batch,
    and the checkpoint folder."""

    root: str                                  # the lakehouse root: a path or any URI Spark writes
    kafka_options: Mapping[str, str]           # kafka.bootstrap.servers and kafka.* security settings
    trigger_s: float = 2.0                     # how often a micro-batch starts (when records wait)
    max_records_per_batch: int = 500_000
    checkpoint: str | None = None              # default: <root>/_checkpoints/ingest

    @property
    def checkpoint_location(self) -> str:
        """Where the queries keep their checkpoints (a folder per table under it)."""
        return self.checkpoint or join(self.root, "_checkpoints", "ingest")


def join(root: str, *parts: str) -> str:
    """`parts` under `root`, joined with '/' (a URI such as s3a://bucket as well as a path)."""
    return "/".join([root.rstrip("/"), *parts])


def table_location(root: str, table: Table) -> str:
    """Where `table` lives under the lakehouse root."""
    return join(root, table.path)


def ensure_tables(session: SparkSession, root: str, tables: list[Table]) -> None:
    """Create each table that does not exist yet (empty, with its schema; ingested ones partitioned
    by event date), so queries and readers find every table from the start."""
    from delta.tables import DeltaTable

    for table in tables:
        builder = (DeltaTable.createIfNotExists(session).location(table_location(root, table))
                   .addColumns(_struct(session, table)))
        if any(name == PARTITION_COLUMN for name, _ in table.columns):
            builder = builder.partitionedBy(PARTITION_COLUMN)
        builder.execute()


def _struct(session: SparkSession, table: Table):
    from pyspark.sql.types import StructType

    return StructType.fromDDL(table.ddl)


@dataclass
class IngestStats:
    """What the running query has done, for heartbeats and `eddy status`."""

    rows: dict[str, int] = field(default_factory=dict)     # table path -> rows appended by this process
    batches: int = 0
    last_batch_ms: int = 0                                  # the slowest table's latest batch
    lag: int | None = None                                  # records in Kafka not yet in a batch
    events: int = 0                                         # input records processed by this process


class Ingestion:
    """start() runs one streaming query per table in the background (Spark overlaps their fixed
    per-batch costs: the Delta commit dominates small batches); poll() reads their progress;
    stop() ends them."""

    def __init__(self, session: SparkSession, spec: PipelineSpec, config: IngestConfig) -> None:
        self.session = session
        self.spec = spec
        self.config = config
        self.tables = ingested_tables(spec)
        self._queries: dict[str, StreamingQuery] = {}
        self._rows = {t.path: 0 for t in self.tables}
        self._seen: dict[str, int] = {}

    def start(self) -> None:
        """Create missing tables, then start one streaming query per table; returns at once. A query
        resumes from its checkpoint, or reads its topic from the earliest offset on its first run."""
        ensure_tables(self.session, self.config.root, self.tables)
        for table in self.tables:
            records = (self.session.readStream.format("kafka")
                       .options(**self.config.kafka_options)
                       .option("subscribe", ",".join(table.topics))
                       .option("startingOffsets", "earliest")
                       .option("includeHeaders", "true")
                       .option("kafka.isolation.level", "read_committed")
                       .option("maxOffsetsPerTrigger", str(self.config.max_records_per_batch))
                       .load())
            self._queries[table.path] = (
                rows_of(table, self.spec, records).writeStream.format("delta")
                .queryName(f"{QUERY_NAME}-{table.layer}-{table.name}")
                .outputMode("append")
                .option("mergeSchema", "true")  # a spec that gains a feature adds its column
                .option("checkpointLocation", join(self.config.checkpoint_location, table.layer, table.name))
                .trigger(processingTime=f"{int(self.config.trigger_s * 1000)} milliseconds")
                .start(table_location(self.config.root, table)))
        log.info("ingesting %s into %s (checkpoints under %s)", ", ".join(", ".join(t.topics) for t in self.tables),
                 self.config.root, self.config.checkpoint_location)

    def poll(self) -> IngestStats:
        """The stats so far; ServiceError when a query has died (with Spark's reason in one line)."""
        if not self._queries:
            raise ServiceError("ingestion has not started")
        stats = IngestStats(rows=self._rows, lag=0)
        for path, query in self._queries.items():
            failure = query.exception()
            if failure is not None:
                raise ServiceError(f"lakehouse ingestion into {path} stopped: {failure_reason(str(failure))}")
            for progress in query.recentProgress:
                # recentProgress repeats earlier reports; count each batch once
                batch = progress.get("batchId", -1)
                if progress.get("numInputRows") and batch > self._seen.get(path, -1):
                    self._seen[path] = batch
                    self._rows[path] += int(progress["numInputRows"])
                    stats.last_batch_ms = max(stats.last_batch_ms,
                                              int((progress.get("durationMs") or {}).get("triggerExecution", 0)))
            last = query.lastProgress
            lag = source_lag(last) if last else None
            stats.lag = None if lag is None or stats.lag is None else stats.lag + lag
        stats.batches = sum(self._seen.get(p, -1) + 1 for p in self._queries)
        stats.events = sum(self._rows.values())
        return stats

    def stop(self) -> None:
        """Stop every query; a batch in flight is redone from the checkpoint at the next start."""
        for query in self._queries.values():
            query.stop()


def source_lag(progress: Mapping[str, Any]) -> int | None:
    """Records in Kafka past the last batch's end offsets, from a query progress report."""
    total = 0
    for source in progress.get("sources") or []:
        latest, end = _offsets(source.get("latestOffset")), _offsets(source.get("endOffset"))
        if latest is None or end is None:
            return None
        for topic, partitions in latest.items():
            for partition, offset in partitions.items():
                total += max(0, int(offset) - int(end.get(topic, {}).get(partition, 0)))
    return total


def _offsets(value: Any) -> dict | None:
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def first_line(message: str) -> str:
    """Spark's own message without the JVM stack trace or the plan that follows it."""
    text = message.strip()
    for marker in ("\nJVM stacktrace:", "\n\tat ", "\n=== Streaming Query ==="):
        text = text.split(marker, 1)[0]
    return " ".join(text.split("\n", 1)[0].split())


def run_ingestion(session: SparkSession, spec: PipelineSpec, config: IngestConfig,
                  on_progress: Callable[[IngestStats], None], should_stop: Callable[[], bool],
                  every_s: float = 1.0) -> IngestStats:
    """Run ingestion until should_stop() is true; on_progress gets the stats about once a second."""
    from py4j.protocol import Py4JError

    ingestion = Ingestion(session, spec, config)
    ingestion.start()
    stats = IngestStats()
    try:
        while not should_stop():
            stats = ingestion.poll()
            on_progress(stats)
            time.sleep(every_s)
        ingestion.stop()
    except Py4JError:
        # `eddy down` signals the whole process group: the JVM may be gone before this loop sees the
        # stop flag; its own shutdown hook stops the queries (each batch commits or replays).
        if not should_stop():
            raise
    return stats


def row_count(root: str, table: Table) -> int:
    """Rows in a table from its Delta log's file statistics (delta-rs, no JVM, no data read);
    0 when the table does not exist yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        actions = DeltaTable(table_location(root, table)).get_add_actions(flatten=True)
    except TableNotFoundError:
        return 0
    return int(sum(n or 0 for n in actions.column("num_records").to_pylist()))


def newest_kafka_timestamp(root: str, table: Table) -> float | None:
    """The newest committed row's Kafka timestamp (epoch seconds) from the Delta log's file statistics
    (no data read); None before the table has a row."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        actions = DeltaTable(table_location(root, table)).get_add_actions(flatten=True)
    except TableNotFoundError:
        return None
    if "max.kafka_timestamp" not in actions.column_names:
        return None
    stamps = [t for t in actions.column("max.kafka_timestamp").to_pylist() if t is not None]
    return max(stamps).timestamp() if stamps else None
