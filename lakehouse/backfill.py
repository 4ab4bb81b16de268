"""The Spark batch backfill of CONTRACT section 5: every event's feature row recomputed from the
source's bronze table with the engines' own validator and feature logic, into
silver/features_backfill, which Feast's offline store reads for point-in-time training sets (so a
feature the spec gained after the events were streamed gets its values for them).

The engines keep an entity's state per source partition and see its records in offset order; the
backfill groups by (partition, entity) and sorts by offset, so each event gets the row the engines
gave it. Of records with the same id the first by (Kafka timestamp, partition, offset) counts, the
others are duplicates (the engines keep the first one they see). Invalid records have no row."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from features.spec import PipelineSpec
from lakehouse.ingest import table_location
from lakehouse.tables import PARTITION_COLUMN, backfill_table, feature_columns, ingested_tables

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _rows(spec: PipelineSpec, records: Iterator) -> Iterator[tuple]:
    """One Spark partition's records, sorted by (source partition, entity, offset) -> backfill rows."""
    from features.windows import FeatureLogic
    from streams.validation import Event, Validator

    validator, logic = Validator(spec), FeatureLogic(spec)
    columns = [(name, float if kind == "double" else int) for name, kind in feature_columns(spec)]
    group, state = None, None
    for r in records:
        event = validator.parse(bytes(r.value))
        if not isinstance(event, Event):
            continue
        if (r.kafka_partition, event.key) != group:
            group, state = (r.kafka_partition, event.key), logic.new_state()
        row = logic.update(state, event.event_time_ms, event.values)
        t = _EPOCH + timedelta(milliseconds=event.event_time_ms)
        values = row.features
        yield (event.event_id, event.key, t,
               *(None if (v := values[name]) is None else kind(v) for name, kind in columns), row.late, r.kafka_topic,
               r.kafka_partition, r.kafka_offset, r.kafka_timestamp, t.date())


def backfill_rows(session: SparkSession, root: str, spec: PipelineSpec) -> DataFrame:
    """The backfill's rows, computed from bronze/<source> at `root` (nothing written)."""
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
    schema = StructType.fromDDL(backfill_table(spec).ddl)
    return session.createDataFrame(records.rdd.mapPartitions(lambda part: _rows(spec, part)), schema)


def write_backfill(session: SparkSession, root: str, spec: PipelineSpec) -> int:
    """Recompute silver/features_backfill (replacing what it held); returns its rows."""
    table = backfill_table(spec)
    location = table_location(root, table)
    rows = backfill_rows(session, root, spec)
    (rows.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
     .partitionBy(PARTITION_COLUMN).save(location))
    return session.read.format("delta").load(location).count()
