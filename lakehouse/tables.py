"""The lakehouse tables of a pipeline, derived from its spec in one place: where each lives, which
topic feeds it, its columns, and the Spark expressions that turn a Kafka record into a row."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from features.spec import PipelineSpec

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

# Every ingested table carries where its record came from, and is partitioned by event date.
KAFKA_COLUMNS = (("kafka_topic", "string"), ("kafka_partition", "int"), ("kafka_offset", "bigint"),
                 ("kafka_timestamp", "timestamp"))
PARTITION_COLUMN = "event_date"
_SQL_TYPES = {"string": "string", "double": "double", "float": "double", "long": "bigint", "int": "bigint",
              "boolean": "boolean", "timestamp": "timestamp"}
_NOT_IDENT = re.compile(r"[^A-Za-z0-9_]")
INT_AGGS = frozenset({"count", "count_distinct"})


@dataclass(frozen=True)
class Table:
    """One Delta table: its SQL name (`bronze.transactions`), its path under the lakehouse root,
    the topic that feeds it (None for tables written by jobs), and its columns as (name, SQL type)."""

    layer: str
    name: str
    topic: str | None
    columns: tuple[tuple[str, str], ...]
    also: tuple[str, ...] = ()  # more topics the same table ingests (gold/predictions: the shadow topic)

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(t for t in (self.topic, *self.also) if t is not None)

    @property
    def sql_name(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def path(self) -> str:
        return f"{self.layer}/{self.name}"

    @property
    def ddl(self) -> str:
        return ", ".join(f"`{n}` {t}" for n, t in self.columns)


def table_name(topic: str) -> str:
    return _NOT_IDENT.sub("_", topic)


def feature_columns(spec: PipelineSpec) -> tuple[tuple[str, str], ...]:
    return tuple((f.name, "bigint" if f.agg in INT_AGGS else "double") for f in spec.features)


def ingested_tables(spec: PipelineSpec) -> list[Table]:
    """The tables ingestion writes from Kafka: bronze (source, labels, DLQ), silver/features,
    gold/predictions."""
    kafka = KAFKA_COLUMNS + (("ingested_at", "timestamp"), (PARTITION_COLUMN, "date"))
    source = tuple((name, _SQL_TYPES[type_]) for name, type_ in spec.field_types.items())
    tables = [Table("bronze", table_name(spec.topics.source), spec.topics.source,
                    (("key", "string"), ("value", "binary")) + source + kafka)]
    if spec.labels is not None:
        tables.append(Table("bronze", table_name(spec.labels.topic), spec.labels.topic,
                            ((spec.labels.id, "string"), (spec.labels.label, "boolean"),
                             ("label_time", "timestamp"), ("value", "binary")) + kafka))
    tables.append(Table("bronze", "dlq", spec.topics.dlq,
                        (("key", "binary"), ("value", "binary"), ("error", "string"), ("stage", "string"),
                         ("source_topic", "string"), ("source_partition", "int"), ("source_offset", "bigint"))
                        + kafka))
    row = (("event_id", "string"), (spec.key, "string"), ("event_time", "timestamp"))
    tables.append(Table("silver", "features", spec.topics.features,
                        row + feature_columns(spec) + (("late", "boolean"),) + kafka))
    # Served predictions and, during a shadow rollout, the shadow ones (role "shadow", kafka_topic the
    # shadow topic): one table, so a version's figures read the same rows whichever role it had.
    tables.append(Table("gold", "predictions", spec.topics.predictions,
                        row + (("score", "double"), ("model_version", "string"), ("role", "string"),
                               ("scored_at", "timestamp"))
                        + feature_columns(spec) + kafka, also=(spec.topics.shadow,)))
    return tables


def backfill_table(spec: PipelineSpec) -> Table:
    """silver/features_backfill: each event's feature row recomputed in batch from bronze (`eddy
    backfill`), with the source record's Kafka position; the shape of silver/features."""
    row = (("event_id", "string"), (spec.key, "string"), ("event_time", "timestamp"))
    return Table("silver", "features_backfill", None,
                 row + feature_columns(spec) + (("late", "boolean"),) + KAFKA_COLUMNS + ((PARTITION_COLUMN, "date"),))


def backfill_refused_table(spec: PipelineSpec) -> Table:
    """silver/features_backfill_refused: the valid events the backfill's apply step refused (what the
    engines dead-letter at the features stage), with the reason and the source record's Kafka position."""
    return Table("silver", "features_backfill_refused", None,
                 (("event_id", "string"), (spec.key, "string"), ("event_time", "timestamp"), ("reason", "string"))
                 + KAFKA_COLUMNS + ((PARTITION_COLUMN, "date"),))


def all_tables(spec: PipelineSpec) -> list[Table]:
    """Every table a query can name: the ingested ones, the backfill and its refusals, the model registry."""
    return ingested_tables(spec) + [backfill_table(spec), backfill_refused_table(spec), MODELS, DRIFT, ROLLOUTS]


MODELS = Table("gold", "models", None, (
    ("version", "string"), ("parent", "string"), ("kind", "string"), ("spec_hash", "string"),
    ("uri", "string"), ("sha256", "string"), ("created_at", "timestamp"), ("metrics", "string"),
    ("published", "boolean"),
))

# Feature drift over time (models.drift): one row per feature, and one for the score (feature null,
# kind "score"), each time the lakehouse stage samples the scorers' merged window.
DRIFT = Table("gold", "drift", None, (
    ("measured_at", "timestamp"), ("version", "string"), ("kind", "string"), ("feature", "string"),
    ("psi", "double"), ("null_share", "double"), ("ref_null_share", "double"), ("rows", "bigint"),
    ("replicas", "bigint"),
))

# Every rollout decision (models.rollout): start, hold, advance, promote, rollback, abort, with the figures.
ROLLOUTS = Table("gold", "rollouts", None, (
    ("decided_at", "timestamp"), ("rollout_id", "string"), ("champion", "string"), ("challenger", "string"),
    ("step", "bigint"), ("percent", "bigint"), ("mode", "string"), ("decision", "string"), ("reason", "string"),
    ("metrics", "string"),
))


# --- Kafka record -> row: Spark expressions, imported only where Spark runs ------------------------------

def timestamp_of(text: Column) -> Column:
    """An event time as the topics carry it (ISO-8601 with an offset, or epoch milliseconds) as a
    Spark timestamp; null when it is neither."""
    from pyspark.sql import functions as F

    return (F.when(text.rlike(r"^-?\d+$"), F.timestamp_millis(text.cast("bigint")))
            .otherwise(F.try_to_timestamp(text)))


def rows_of(table: Table, spec: PipelineSpec, records: DataFrame) -> DataFrame:
    """The table's rows from Kafka records (columns key, value, topic, partition, offset, timestamp,
    headers), in the table's column order. A field that does not parse is null; the raw record
    stays in bronze's `value`."""
    from pyspark.sql import functions as F

    text = F.col("value").cast("string")
    kafka = {"kafka_topic": F.col("topic"), "kafka_partition": F.col("partition"),
             "kafka_offset": F.col("offset"), "kafka_timestamp": F.col("timestamp"),
             "ingested_at": F.current_timestamp()}
    json_fields: dict[str, str] = {}
    derived: dict[str, Column] = {}
    event_time: Column | None = None
    if table.layer == "bronze" and table.topic == spec.topics.source:
        json_fields = {n: ("string" if t == "timestamp" else _SQL_TYPES[t]) for n, t in spec.field_types.items()}
        derived = {"key": F.col("key").cast("string"), "value": F.col("value")}
        for name, type_ in spec.field_types.items():
            if type_ == "timestamp":
                derived[name] = timestamp_of(F.col(f"j.{name}"))
        event_time = derived[spec.timestamp_field]
    elif table.layer == "bronze" and spec.labels is not None and table.topic == spec.labels.topic:
        json_fields = {spec.labels.id: "string", spec.labels.label: "boolean", "label_time": "string"}
        derived = {"value": F.col("value"), "label_time": timestamp_of(F.col("j.label_time"))}
        event_time = derived["label_time"]
    elif table.name == "dlq":
        def header(name: str) -> Column:
            return F.filter(F.col("headers"), lambda h: h["key"] == name)[0]["value"].cast("string")

        derived = {"key": F.col("key"), "value": F.col("value"), "error": header("eddy.error"),
                   "stage": header("eddy.stage"), "source_topic": header("eddy.source.topic"),
                   "source_partition": header("eddy.source.partition").cast("int"),
                   "source_offset": header("eddy.source.offset").cast("bigint")}
    else:  # silver/features and gold/predictions: the features map flattened to typed columns
        json_fields = {"event_id": "string", spec.key: "string", "event_time": "string"}
        if table.name == "predictions":
            json_fields.update(score="double", model_version="string", role="string", scored_at="string")
            derived["scored_at"] = timestamp_of(F.col("j.scored_at"))
            derived["role"] = F.coalesce(F.col("j.role"), F.lit("champion"))  # predictions from before rollouts
        else:
            json_fields["late"] = "boolean"
        features = ", ".join(f"`{n}` {t}" for n, t in feature_columns(spec))
        json_fields["features"] = f"struct<{features}>"
        derived["event_time"] = timestamp_of(F.col("j.event_time"))
        for name, _ in feature_columns(spec):
            derived[name] = F.col(f"j.features.{name}")
        event_time = derived["event_time"]
    if json_fields:
        schema = ", ".join(f"`{n}` {t}" for n, t in json_fields.items())
        records = records.withColumn("j", F.from_json(text, schema, {"mode": "PERMISSIVE"}))
    columns = []
    for name, type_ in table.columns:
        if name == PARTITION_COLUMN:
            column = F.to_date(F.col("timestamp") if event_time is None else F.coalesce(event_time, F.col("timestamp")))
        elif name in kafka:
            column = kafka[name]
        elif name in derived:
            column = derived[name]
        else:
            column = F.col(f"j.{name}")
        columns.append(column.cast(type_).alias(name))
    return records.select(*columns)
