"""Training-set reads: the feature rows the stream computed for each labelled event (silver/features
joined with the newest label per event from bronze/labels), oldest event first; a feature the spec
gained after those rows were streamed comes from a point-in-time retrieval (Feast's, over the
backfill) that the caller supplies."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from features.errors import EddyError
from features.spec import PipelineSpec
from lakehouse.ingest import table_location
from lakehouse.tables import feature_columns, ingested_tables

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import SparkSession


def labelled_features(session: SparkSession, root: str, spec: PipelineSpec,
                      point_in_time: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per labelled event that has a features row: event_id, the entity key, event_time
    (UTC), one column per feature, late, label (0/1); sorted by event time then Kafka position.
    Features silver/features has no column for are point_in_time(frame of key and event_time)'s."""
    if spec.labels is None:
        raise EddyError(f"spec {spec.name!r} has no labels section: nothing to train on")
    tables = {t.topic: t for t in ingested_tables(spec)}
    features = session.read.format("delta").load(table_location(root, tables[spec.topics.features]))
    labels = session.read.format("delta").load(table_location(root, tables[spec.labels.topic]))
    features.createOrReplaceTempView("eddy_features")
    labels.createOrReplaceTempView("eddy_labels")
    streamed = set(features.columns)
    missing = [n for n, _ in feature_columns(spec) if n not in streamed]
    if missing and point_in_time is None:
        raise EddyError(f"silver/features has no {', '.join(missing)}: the spec gained them after its rows were "
                        "streamed; run `eddy backfill` (it recomputes every event's features), then retrain")
    names = ", ".join(f"CAST(NULL AS DOUBLE) AS `{n}`" if n in missing else f"f.`{n}`" for n, _ in feature_columns(spec))
    lid, label = spec.labels.id, spec.labels.label
    frame: pd.DataFrame = session.sql(f"""
        WITH newest_label AS (
            SELECT `{lid}` AS event_id, max_by(`{label}`, struct(label_time, kafka_timestamp)) AS label
            FROM eddy_labels WHERE `{lid}` IS NOT NULL AND `{label}` IS NOT NULL GROUP BY `{lid}`),
        one_row AS (
            SELECT *, row_number() OVER (PARTITION BY event_id ORDER BY kafka_timestamp, kafka_offset) AS n
            FROM eddy_features WHERE event_id IS NOT NULL AND event_time IS NOT NULL)
        SELECT f.event_id, f.`{spec.key}`, f.event_time, {names}, f.late, CAST(l.label AS INT) AS label
        FROM one_row f JOIN newest_label l ON f.event_id = l.event_id
        WHERE f.n = 1
        ORDER BY f.event_time, f.kafka_partition, f.kafka_offset""").toPandas()
    if missing and point_in_time is not None:  # checked above: missing features need point_in_time
        filled = point_in_time(frame[[spec.key, "event_time"]])
        for name in missing:
            frame[name] = filled[name].to_numpy()
    return frame


def unjoined_labels(session: SparkSession, root: str, spec: PipelineSpec) -> int:
    """How many labelled event ids have no features row in silver/features: labels of events whose row
    has not landed yet, or of ids no event carries. They are not dropped: they stay in bronze/labels, and
    any later retrain joins them once the row is there, however late the label came."""
    if spec.labels is None:
        return 0
    tables = {t.topic: t for t in ingested_tables(spec)}
    features = session.read.format("delta").load(table_location(root, tables[spec.topics.features]))
    labels = session.read.format("delta").load(table_location(root, tables[spec.labels.topic]))
    ids = labels.where(labels[spec.labels.id].isNotNull()).select(labels[spec.labels.id].alias("event_id")).distinct()
    return ids.join(features.select("event_id"), "event_id", "left_anti").count()

