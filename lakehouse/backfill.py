"""The Spark batch backfill: every event's feature row recomputed from the source's bronze table with
the engines' own validator and apply step, into silver/features_backfill, which Feast's offline store
reads for point-in-time training sets (so a feature the spec gained after the events were streamed gets
its values for them). Events the apply step refuses go to silver/features_backfill_refused with the
reason, as the engines send them to the DLQ.

The engines keep an entity's state per source partition and see its records in offset order; the
backfill groups by (partition, entity) and sorts by offset, so each event gets the row the engines
gave it. Of records with the same id the first by (Kafka timestamp, partition, offset) counts, the
others are duplicates (the engines keep the first one they see). Invalid records have no row."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from features.spec import PipelineSpec
from lakehouse.ingest import table_location
from lakehouse.tables import (
    PARTITION_COLUMN,
    backfill_refused_table,
    backfill_table,
    feature_columns,
    ingested_tables,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _rows(spec: PipelineSpec, records: Iterable[Any]) -> Iterator[tuple]:
    """One Spark partition's records, sorted by (source partition, entity, offset) -> one row each:
    the backfill table's columns, then the refusal's reason (None for a feature row)."""
    from features.apply import ApplyStep, Refused
    from features.validation import Event, Validator

    validator, step = Validator(spec), ApplyStep(spec)
    logic = step.logic
    columns = [(name, float if kind == "double" else int) for name, kind in feature_columns(spec)]
    nothing = (None,) * len(columns)
    group: tuple[int, str] | None = None
    state = logic.new_state()  # each group starts a new one: the first record's does
    for r in records:
        event = validator.parse(bytes(r.value))
        if not isinstance(event, Event):
            continue
        if (r.kafka_partition, event.key) != group:
            group, state = (r.kafka_partition, event.key), logic.new_state()
        arrival = round(r.kafka_timestamp.timestamp() * 1000)
        row = step.apply(state, event, arrival)
        t = _EPOCH + timedelta(milliseconds=event.event_time_ms)
        position = (r.kafka_topic, r.kafka_partition, r.kafka_offset, r.kafka_timestamp, t.date())
        if isinstance(row, Refused):
            yield (event.event_id, event.key, t, *nothing, None, *position, str(row))
            continue
        values = row.features
        yield (event.event_id, event.key, t,
               *(None if (v := values[name]) is None else kind(v) for name, kind in columns), row.late,
               *position, None)


def backfill_rows(session: SparkSession, root: str, spec: PipelineSpec) -> DataFrame:
    """The backfill's rows computed from bronze/<source> at `root` (nothing written): the backfill
    table's columns plus `refused`, the apply step's reason where it refused the event."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    source = next(t for t in ingested_tables(spec) if t.topic == spec.topics.source)
    bronze = session.read.format("delta").load(table_location(root, source))
    first = Window.partitionBy(spec.id_field).orderBy("kafka_timestamp", "kafka_partition", "kafka_offset")
    records = (bronze.where(F.col(f"`{spec.key}`").isNotNull() & F.col(f"`{spec.id_field}`").isNotNull())
               .withColumn("eddy_seen_", F.row_number().over(first)).where("eddy_seen_ = 1")
               .select("value", "kafka_topic", "kafka_partition", "kafka_offset", "kafka_timestamp",
                       F.col(f"`{spec.key}`").alias("eddy_key_"))
               .repartition("kafka_partition", "eddy_key_")
               .sortWithinPartitions("kafka_partition", "eddy_key_", "kafka_offset"))
    # fromDDL is typed DataType; the DDL of a list of columns parses to a StructType
    schema = cast(StructType, StructType.fromDDL(backfill_table(spec).ddl + ", `refused` string"))
    return session.createDataFrame(records.rdd.mapPartitions(lambda part: _rows(spec, part)), schema)


def write_backfill(session: SparkSession, root: str, spec: PipelineSpec) -> int:
    """Recompute silver/features_backfill and silver/features_backfill_refused (replacing what they
    held); returns the backfill's rows."""
    from pyspark.sql import functions as F

    rows = backfill_rows(session, root, spec).persist()
    try:
        table, refusals = backfill_table(spec), backfill_refused_table(spec)
        kept = rows.where(F.col("refused").isNull()).select(*(f"`{name}`" for name, _ in table.columns))
        refused = (rows.where(F.col("refused").isNotNull()).withColumnRenamed("refused", "reason")
                   .select(*(f"`{name}`" for name, _ in refusals.columns)))
        for frame, target in ((kept, table), (refused, refusals)):
            (frame.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
             .partitionBy(PARTITION_COLUMN).save(table_location(root, target)))
    finally:
        rows.unpersist()
    return session.read.format("delta").load(table_location(root, table)).count()
