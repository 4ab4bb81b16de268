"""Feast's Spark offline store over a real silver/features Delta table: point-in-time features for a
labels frame, row for row, with no later row leaking and nulls where nothing is in reach."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy.settings import REPO_ROOT
from features.feast_repo import feature_dtypes, ttl
from features.spec import load_spec
from lakehouse.ingest import ensure_tables, table_location
from lakehouse.offline import (
    QUOTED_REGEX_CONF,
    features_table,
    historical_features,
    offline_feature_store,
)

pytestmark = [pytest.mark.spark, pytest.mark.slow]

SPEC = load_spec(REPO_ROOT / "pipelines" / "fraud.yaml")
TTL = ttl(SPEC)                                   # 24 h 30 s for fraud
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
NOWHERE = "redis://127.0.0.1:1/0"                 # named in feature_store.yaml, never connected to
MIN, H = timedelta(minutes=1), timedelta(hours=1)

# (card, event_time, amount_sum_1h, late, kafka_offset): amount_sum_1h tells the rows apart.
FEATURE_ROWS = [
    ("a", T0 - 10 * MIN, 1.0, False, 1),
    ("a", T0 - 1 * MIN, 50.0, True, 2),     # late: the online store never took it, nor may training
    ("a", T0 + 1 * MIN, 99.0, False, 3),    # after the first label: must not leak into it
    ("c", T0 - TTL - MIN, 3.0, False, 4),   # older than the TTL
    ("d", T0 - TTL, 4.0, False, 5),         # exactly at the TTL's edge: still in reach
    ("e", T0 - 5 * MIN, 5.0, False, 6),     # two rows at one time: the later record wins,
    ("e", T0 - 5 * MIN, 6.0, False, 7),     # and the label is not returned twice
    ("f", T0, 7.0, False, 8),               # at the label's very time: in reach (<=)
    ("g", T0 - 20 * H, 8.0, False, 9),      # the day before (another event_date partition)
    ("g", T0 + 2 * H, 9.0, False, 10),
]

# (event_id, card, event_time, is_fraud) -> expected amount_sum_1h (None: null)
LABELS = [
    (("l1", "a", T0, True), 1.0),
    (("l2", "b", T0, False), None),             # a card with no feature rows at all
    (("l3", "c", T0, False), None),
    (("l4", "d", T0, True), 4.0),
    (("l5", "e", T0, False), 6.0),
    (("l6", "f", T0, False), 7.0),
    (("l7", "g", T0, True), 8.0),
    (("l8", "a", T0 + 2 * MIN, True), 99.0),    # a later label of the same card sees the later row
    (("l9", "a", T0, False), 1.0),              # a second label at the same card and time: kept
    (("l10", "a", T0 - 11 * MIN, False), None), # before the card's first row
    (("l11", None, T0, False), None),           # no key
    (("l12", "a", None, True), None),           # no time
]


def write_features(spark, root: str) -> str:
    from pyspark.sql.types import StructType

    table = features_table(SPEC)
    ensure_tables(spark, root, [table])
    names = list(feature_dtypes(SPEC))
    rows = []
    for card, t, amount_sum, late, offset in FEATURE_ROWS:
        features = {n: None for n in names} | {"txn_count_1m": offset, "amount_sum_1h": amount_sum}
        rows.append((f"ev{offset}", card, t, *features.values(), late, "features", 0, offset,
                     T0 + timedelta(seconds=offset), T0 + H, t.date()))
    frame = spark.createDataFrame(rows, StructType.fromDDL(table.ddl))
    location = table_location(root, table)
    frame.write.format("delta").mode("append").save(location)
    return location


def labels_frame():
    import pandas as pd

    frame = pd.DataFrame([row for row, _ in LABELS], columns=["event_id", "card_id", "event_time", "is_fraud"])
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True).dt.as_unit("us")
    frame.index = [f"r{i}" for i in range(len(frame))]   # a caller's own index survives
    return frame


def test_point_in_time_features_row_for_row(spark, tmp_path: Path):
    import numpy as np

    from lakehouse.snapshot import read_snapshot

    root = str(tmp_path / "lake")
    location = write_features(spark, root)
    store = offline_feature_store(spark, SPEC, root, tmp_path / "feast", NOWHERE)
    labels = labels_frame()
    regex_before = spark.conf.get(QUOTED_REGEX_CONF)

    got = historical_features(spark, store, SPEC, labels)

    assert len(got) == len(labels) == len(LABELS)
    assert list(got.index) == list(labels.index)
    assert got[list(labels.columns)].equals(labels)           # the labels' own columns untouched
    expected = [value for _, value in LABELS]
    for (row, value), (_, out) in zip(LABELS, got.iterrows(), strict=True):
        assert out["event_id"] == row[0]
        if value is None:
            assert math.isnan(out["amount_sum_1h"]) and math.isnan(out["txn_count_1m"]), row
        else:
            assert out["amount_sum_1h"] == value, row
    assert [None if math.isnan(v) else v for v in got["amount_sum_1h"]] == expected
    # counts are float64 too, so a missing one is NaN; the values are the rows' own
    assert got["txn_count_1m"].dtype == np.float64
    assert got.loc["r0", "txn_count_1m"] == 1 and got.loc["r4", "txn_count_1m"] == 7
    assert got["secs_since_last"].isna().all()                 # null in every row written

    # Feast's Spark store leaves the shared session as it found it
    assert spark.conf.get(QUOTED_REGEX_CONF) == regex_before
    views = {t.name for t in spark.catalog.listTables() if t.isTemporary}
    assert not any(v.startswith("feast_entity_df_") or v in ("entity_dataframe", "fraud__cleaned") for v in views)

    # a second store over the same repo leaves the applied registry alone, and gives the same answer
    registry = tmp_path / "feast" / "registry.db"
    written = registry.stat().st_mtime_ns
    again = historical_features(spark, offline_feature_store(spark, SPEC, root, tmp_path / "feast", NOWHERE),
                                SPEC, labels.iloc[::-1])
    assert registry.stat().st_mtime_ns == written
    assert again.loc[labels.index, "amount_sum_1h"].equals(got["amount_sum_1h"])

    # delta-rs reads the same table Spark wrote
    table = read_snapshot(location).to_pandas()
    assert len(table) == len(FEATURE_ROWS)
    by_offset = table.set_index("kafka_offset").sort_index()
    assert by_offset["amount_sum_1h"].tolist() == [r[2] for r in FEATURE_ROWS]
    assert by_offset["card_id"].tolist() == [r[0] for r in FEATURE_ROWS]
    assert by_offset["late"].tolist() == [r[3] for r in FEATURE_ROWS]


def test_an_empty_labels_frame_gives_an_empty_frame_with_the_feature_columns(spark, tmp_path: Path):
    store = offline_feature_store(spark, SPEC, str(tmp_path / "lake"), tmp_path / "feast", NOWHERE)
    got = historical_features(spark, store, SPEC, labels_frame().iloc[:0])
    assert got.empty
    assert list(got.columns) == ["event_id", "card_id", "event_time", "is_fraud", *feature_dtypes(SPEC)]


def test_a_labels_frame_without_the_key_is_refused(spark, tmp_path: Path):
    store = offline_feature_store(spark, SPEC, str(tmp_path / "lake"), tmp_path / "feast", NOWHERE)
    with pytest.raises(ValueError, match="card_id"):
        historical_features(spark, store, SPEC, labels_frame().drop(columns="card_id"))
