"""Feast's offline store over the lakehouse: the feature view's history is silver/features (Delta),
read by Feast's Spark store in the caller's SparkSession, and point-in-time features for a labels
frame come back row for row, in order, with nulls where no row is in reach."""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features.errors import ConfigError, EddyError
from features.feast_repo import (
    TIMESTAMP_FIELD,
    OfflineSource,
    feature_dtypes,
    feature_store,
    view_name,
)
from features.spec import PipelineSpec
from lakehouse.ingest import table_location
from lakehouse.tables import KAFKA_COLUMNS, PARTITION_COLUMN, Table, ingested_tables

if TYPE_CHECKING:
    import feast
    import pandas as pd
    from pyspark.sql import SparkSession

ENTITY_TIMESTAMP = "event_timestamp"  # the entity frame's time column as Feast names it (no guessing)
ROW_COLUMN = "eddy_row_"              # each label's position, carried through Spark to restore order
QUOTED_REGEX_CONF = "spark.sql.parser.quotedRegexColumnNames"  # Feast sets it on the shared session
ARROW_CONF = "spark.sql.execution.arrow.pyspark.enabled"
_UTC_ZONES = frozenset({"UTC", "Etc/UTC", "GMT", "Etc/GMT", "Z", "+00:00"})
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FEAST_WARNINGS = ("The spark offline store is an experimental", "The spark data source API is an experimental")
_TEMP_VIEW = re.compile(r"CREATE OR REPLACE TEMPORARY VIEW\s+(\w+)|\b(feast_entity_df_[0-9a-f]{32})\b")
# Feast's Spark store creates temp views under fixed names (entity_dataframe, <view>__cleaned):
# two retrievals at once in one process would overwrite each other's.
_RETRIEVAL = threading.Lock()


class RetrievalError(EddyError):
    """The point-in-time join did not give one row per label (a bug, never silently repaired)."""


def features_table(spec: PipelineSpec) -> Table:
    return next(t for t in ingested_tables(spec) if t.layer == "silver" and t.name == "features")


def features_query(spec: PipelineSpec, root: str, table: Table | None = None) -> str:
    """The silver/features rows Feast may join: late rows left out (the online store never takes
    them either), and one row per (key, event_time): of equal times the later record, which saw
    more events (as the online writer keeps it); a replayed record is a duplicate of one already
    there. Without this, Feast's join returns a label once per tied row.

    event_date is in the window's partition so Feast's event_date and event_time filters reach
    the scan (partition pruning) through the window. `table` is silver/features unless given (the
    backfill has its shape)."""
    table = table or features_table(spec)
    kept = [name for name, _ in table.columns
            if name not in {"late", "ingested_at"} and name not in dict(KAFKA_COLUMNS)]
    columns = ", ".join(f"`{name}`" for name in kept)
    location = table_location(root, table).replace("`", "``")
    return (f"SELECT {columns} FROM ("
            f"SELECT *, ROW_NUMBER() OVER (PARTITION BY `{spec.key}`, `{PARTITION_COLUMN}`, `{TIMESTAMP_FIELD}` "
            f"ORDER BY kafka_timestamp DESC, kafka_offset DESC, event_id DESC) AS eddy_rank_ "
            f"FROM delta.`{location}` WHERE late IS NOT TRUE) WHERE eddy_rank_ = 1")


def spark_offline_source(spec: PipelineSpec, root: str, table: Table | None = None) -> OfflineSource:
    """Feast's Spark offline store with the view's batch source on silver/features (or `table`, of
    its shape) at `root`: a query source (for the late filter and the dedup above) that also
    records the Delta path."""
    table = table or features_table(spec)

    def batch_source(name: str, timestamp_field: str) -> Any:
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
        from feast.table_format import DeltaFormat

        source = SparkSource(
            name=name, query=features_query(spec, root, table), path=table_location(root, table),
            table_format=DeltaFormat(), timestamp_field=timestamp_field,
            date_partition_column=PARTITION_COLUMN, date_partition_column_format="%Y-%m-%d",
            description=f"{table.path} of pipeline {spec.name}, late rows left out",
        )
        # The registry's own form (unset options read back as ""), so a second feature_store()
        # finds the applied view equal and leaves the registry alone.
        return SparkSource.from_proto(source.to_proto())

    return OfflineSource(store={"type": "spark"}, batch_source=batch_source)


def offline_feature_store(session: SparkSession, spec: PipelineSpec, root: str, repo_dir: Path,
                          redis_url: str, table: Table | None = None) -> feast.FeatureStore:
    """The Feast store whose offline store is Spark over silver/features (or `table`) at `root`,
    set up under repo_dir (a repo of its own: not the online writer's, one per table). The Redis
    online store is only named: nothing here connects to it."""
    _check_session(session)
    if not _IDENTIFIER.match(view_name(spec)):
        raise ConfigError(f"pipeline name {spec.name!r}: Feast's Spark store puts the feature view's name in "
                          "SQL unquoted; name the pipeline with letters, digits and '_' only")
    with _feast_on(session):
        return feature_store(spec, repo_dir, redis_url, offline=spark_offline_source(spec, root, table))


def historical_features(session: SparkSession, store: feast.FeatureStore, spec: PipelineSpec,
                        labels: pd.DataFrame) -> pd.DataFrame:
    """`labels` with one float64 column per feature: for each row, the feature row of its entity
    (spec.key) that is the latest at or before its `event_time` and no older than the view's TTL;
    NaN where there is none (and for a row with no key or no time). Same rows, same order, same
    index; naive times are taken as UTC. Only the key and the time go to Spark; the other columns
    stay as they are."""
    import numpy as np
    import pandas as pd

    names = list(feature_dtypes(spec))
    missing = [c for c in (spec.key, TIMESTAMP_FIELD) if c not in labels.columns]
    if missing:
        raise ValueError(f"the labels frame has no {', '.join(missing)} column; it needs {spec.key} and "
                         f"{TIMESTAMP_FIELD} (the label's event time)")
    clash = [c for c in names if c in labels.columns]
    if clash:
        raise ValueError(f"the labels frame already has feature column(s) {', '.join(clash)}; drop them first")
    times = pd.to_datetime(labels[TIMESTAMP_FIELD], utc=True)
    keys = labels[spec.key].to_numpy(dtype=object, na_value=None)
    # A row with no key or no time matches nothing: it stays out of Spark and gets NaN.
    valid = np.flatnonzero(pd.notna(keys) & times.notna().to_numpy())
    values = np.full((len(names), len(labels)), np.nan)
    if len(valid):
        rows = _point_in_time(session, store, spec, pd.DataFrame({
            spec.key: keys[valid],
            ENTITY_TIMESTAMP: times.iloc[valid].reset_index(drop=True),
            ROW_COLUMN: valid.astype(np.int64),
        }))
        for i, name in enumerate(names):
            values[i, rows[ROW_COLUMN].to_numpy()] = rows[name].to_numpy(dtype=np.float64, na_value=np.nan)
    out = labels.copy()
    for i, name in enumerate(names):
        out[name] = values[i]
    return out


def _point_in_time(session: SparkSession, store: feast.FeatureStore, spec: PipelineSpec,
                   entity: pd.DataFrame) -> pd.DataFrame:
    """Feast's point-in-time join of the entity frame: ROW_COLUMN and the features, one row per
    entity row (RetrievalError otherwise)."""
    names = list(feature_dtypes(spec))
    refs = [f"{view_name(spec)}:{name}" for name in names]
    with _RETRIEVAL, _feast_on(session):
        from feast.infra.offline_stores.contrib.spark_offline_store.spark import SparkRetrievalJob

        job = store.get_historical_features(entity_df=entity, features=refs)
        if not isinstance(job, SparkRetrievalJob):
            raise ConfigError(f"the feature store's offline store gave a {type(job).__name__}, not Spark's job; "
                              "its feature_store.yaml must name the spark offline store")
        try:
            if job.spark_session is not session:
                raise ConfigError("Feast's Spark store picked a Spark session other than the one given; "
                                  "call this from the thread that started the session")
            rows: pd.DataFrame = job.to_spark_df().select(ROW_COLUMN, *names).toPandas()
        finally:
            _drop_temp_views(session, job.query)
    if len(rows) != len(entity) or set(rows[ROW_COLUMN]) != set(entity[ROW_COLUMN]):
        raise RetrievalError(f"the point-in-time join gave {len(rows)} rows ({rows[ROW_COLUMN].nunique()} "
                             f"distinct) for {len(entity)} labels")
    return rows


# --- helpers -------------------------------------------------------------------------------------------

def _check_session(session: SparkSession) -> None:
    """Feast writes its time bounds as naive UTC strings that Spark reads in the session's zone."""
    zone = session.conf.get("spark.sql.session.timeZone")
    if zone not in _UTC_ZONES:
        raise ConfigError(f"the Spark session's time zone is {zone!r}; point-in-time joins need "
                          "spark.sql.session.timeZone=UTC (lakehouse.session.start_session sets it)")


@contextmanager
def _feast_on(session: SparkSession) -> Iterator[None]:
    """Feast's Spark store on `session`: made this thread's active session (the one Feast takes),
    its two "experimental" RuntimeWarnings silenced, Arrow off where this pyarrow cannot serve
    PySpark, and the session's settings that Feast or this flips put back."""
    _check_session(session)
    before = {key: session.conf.get(key) for key in (QUOTED_REGEX_CONF, ARROW_CONF)}
    if not _arrow_usable():
        # else each pandas <-> Spark conversion warns and falls back anyway
        session.conf.set(ARROW_CONF, "false")
    try:
        # PySpark has no public setter for the active session; creating a DataFrame sets it (no job runs).
        session.createDataFrame([], "x int")
        with warnings.catch_warnings():
            # Its import puts a "once" filter for every RuntimeWarning first in line: import it
            # here, so that filter ends with this block and the two below come before it.
            import feast.infra.offline_stores.contrib.spark_offline_store.spark  # noqa: F401

            for message in _FEAST_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=RuntimeWarning)
            yield
    finally:
        for key, value in before.items():
            if value is None:  # not set before (both settings have defaults, so not expected)
                session.conf.unset(key)
            else:
                session.conf.set(key, value)


def _arrow_usable() -> bool:
    """Whether PySpark's Arrow conversions work with the installed pyarrow (PySpark 4.2 wants >= 18;
    apache-flink's apache-beam holds pyarrow at 16)."""
    from pyspark.errors import PySparkImportError
    from pyspark.sql.pandas.utils import require_minimum_pyarrow_version

    try:
        require_minimum_pyarrow_version()
    except (ImportError, PySparkImportError):
        return False
    return True


def _drop_temp_views(session: SparkSession, query: str) -> None:
    """Drop the temp views one retrieval made (the entity frame's holds its rows in memory)."""
    for created, entity in _TEMP_VIEW.findall(query):
        session.catalog.dropTempView(created or entity)
