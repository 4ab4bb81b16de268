"""The Spark batch backfill on real Delta tables: from a bronze table holding the stream with every
awkward case (out of order, late, duplicates, invalid records), each first-seen valid event's row
equals the naive reference, as the engines' rows do (docs/contract.md, feature semantics); and a training set whose
spec gained a feature after silver/features was written gets that feature by Feast's point-in-time
retrieval over the backfill."""

from __future__ import annotations

import math
import zlib
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pytest
import yaml

from deploy.settings import REPO_ROOT
from features.spec import parse_spec
from lakehouse.backfill import write_backfill
from lakehouse.ingest import ensure_tables, table_location
from lakehouse.offline import historical_features, offline_feature_store
from lakehouse.tables import backfill_refused_table, backfill_table, ingested_tables, rows_of
from lakehouse.training import labelled_features, unjoined_labels
from tests.parity import FUTURE_REASON, dead_letters, make_stream, reference_rows, same_features

pytestmark = [pytest.mark.spark, pytest.mark.slow]

NOWHERE = "redis://127.0.0.1:1/0"
FRAUD = yaml.safe_load((REPO_ROOT / "pipelines" / "fraud.yaml").read_text())
T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def write_bronze(spark, root: str, spec, stream) -> None:
    """bronze/<source> as ingestion writes it, from (key, value, Kafka timestamp ms) records in produce
    order: each key's records in one partition, offsets in order."""
    from pyspark.sql.types import StructType

    source = next(t for t in ingested_tables(spec) if t.topic == spec.topics.source)
    ensure_tables(spark, root, [source])
    offsets, records = [0, 0, 0], []
    for key, value, stamp in stream:
        p = zlib.crc32(key or b"") % 3
        records.append((key, value, spec.topics.source, p, offsets[p], _EPOCH + timedelta(milliseconds=stamp), []))
        offsets[p] += 1
    kafka = spark.createDataFrame(records, StructType.fromDDL(
        "key binary, value binary, topic string, partition int, offset bigint, timestamp timestamp, "
        "headers array<struct<key: string, value: binary>>"))
    rows_of(source, spec, kafka).write.format("delta").mode("append").save(table_location(root, source))


@pytest.mark.parametrize("pipeline", ["fraud.yaml", "sensors.yaml"])
def test_the_backfill_gives_each_event_the_reference_row(spark, tmp_path, pipeline):
    from lakehouse.snapshot import read_snapshot

    spec = parse_spec(yaml.safe_load((REPO_ROOT / "pipelines" / pipeline).read_text()))
    stream = make_stream(spec, seed=5)
    expected = reference_rows(spec, stream)
    root = str(tmp_path / "lake")
    write_bronze(spark, root, spec, stream)

    assert write_backfill(spark, root, spec) == len(expected)

    got = read_snapshot(table_location(root, backfill_table(spec))).to_pandas()
    assert sorted(got["event_id"]) == sorted(expected)  # one row per first-seen valid event, nothing else
    # the apply step's refusals, as the engines dead-letter them: the event stamped too far ahead
    refused = read_snapshot(table_location(root, backfill_refused_table(spec))).to_pandas()
    ahead = [orjson.loads(raw)[spec.id_field] for raw, reason in dead_letters(spec, stream) if reason == FUTURE_REASON]
    assert len(ahead) == 1 and sorted(refused["event_id"]) == ahead
    assert all(FUTURE_REASON in reason for reason in refused["reason"])
    names = [f.name for f in spec.features]
    late = 0
    for _, row in got.iterrows():
        features, is_late = expected[row["event_id"]]
        assert bool(row["late"]) is is_late, row["event_id"]
        late += is_late
        if not is_late:
            values = {n: (None if isinstance(v, float) and math.isnan(v) else v) for n, v in row[names].items()}
            assert same_features(values, features), (row["event_id"], values, features)
    assert 10 <= late < len(expected) // 4


def test_a_feature_added_after_the_fact_comes_from_the_backfill_point_in_time(spark, tmp_path):
    """silver/features was streamed under a spec without merchants_24h; the spec now has it. The
    training set takes the other features from the stream's rows and merchants_24h from Feast's
    point-in-time retrieval over the backfill: each labelled event's own value."""
    from pyspark.sql.types import StructType

    from streams.generator import GeneratorConfig, TransactionGenerator

    full = parse_spec({**FRAUD, "name": "later"})
    earlier = parse_spec({**FRAUD, "name": "later",
                          "features": [f for f in FRAUD["features"] if f["name"] != "merchants_24h"]})
    batch = TransactionGenerator(GeneratorConfig(seed=3, cards=40, start_ms=int(T0.timestamp() * 1000),
                                                 mean_gap_ms=20_000, id_prefix="g")).batch(600)
    stream = list(zip(batch.keys, batch.values, batch.event_time_ms.tolist(), strict=True))
    root = str(tmp_path / "lake")
    write_bronze(spark, root, full, stream)
    write_backfill(spark, root, full)

    # silver/features as the earlier spec's stream wrote it (its rows, without merchants_24h), and labels
    reference = reference_rows(full, stream)
    silver = next(t for t in ingested_tables(earlier) if t.layer == "silver")
    ensure_tables(spark, root, [silver])
    times = dict(zip(batch.event_ids, batch.event_time_ms.tolist(), strict=True))
    keys = {eid: key.decode() for eid, key in zip(batch.event_ids, batch.keys, strict=True)}
    kept = [f["name"] for f in FRAUD["features"] if f["name"] != "merchants_24h"]
    rows = []
    for offset, (event_id, (features, is_late)) in enumerate(reference.items()):
        t = datetime.fromtimestamp(times[event_id] / 1000, UTC)
        rows.append((event_id, keys[event_id], t, *(features[n] for n in kept), is_late, "features", 0, offset,
                     t, t, t.date()))
    spark.createDataFrame(rows, StructType.fromDDL(silver.ddl)).write.format("delta").mode("append").save(
        table_location(root, silver))
    labels = next(t for t in ingested_tables(full) if t.topic == full.labels.topic)
    ensure_tables(spark, root, [labels])
    label_rows = [(eid, bool(fraud), T0, b"", "labels", 0, i, T0, T0, T0.date())
                  for i, (eid, fraud) in enumerate(zip(batch.event_ids, batch.is_fraud.tolist(), strict=True))]
    late = T0 + timedelta(hours=5)  # labels of events that never streamed: counted, not joined
    label_rows += [(eid, True, late, b"", "labels", 0, len(label_rows) + i, late, late, late.date())
                   for i, eid in enumerate(["never-streamed-1", "never-streamed-2"])]
    spark.createDataFrame(label_rows, StructType.fromDDL(labels.ddl)).write.format("delta").mode("append").save(
        table_location(root, labels))

    with pytest.raises(Exception, match="run `eddy backfill`"):
        labelled_features(spark, root, full)
    store = offline_feature_store(spark, full, root, tmp_path / "feast", NOWHERE, table=backfill_table(full))
    frame = labelled_features(spark, root, full, point_in_time=lambda f: historical_features(spark, store, full, f))

    assert len(frame) == len(reference)
    assert unjoined_labels(spark, root, full) == len(set(batch.event_ids) - set(reference)) + 2
    # an event's own value wherever its (card, time) is its alone (else Feast takes the later record's)
    counts = pd.Series([(keys[e], times[e]) for e in frame["event_id"]]).value_counts()
    unique = [(keys[e], times[e]) in counts[counts == 1].index for e in frame["event_id"]]
    assert sum(unique) > 0.9 * len(frame)
    for (_, row), alone in zip(frame.iterrows(), unique, strict=True):
        features, _ = reference[row["event_id"]]
        if alone:
            assert row["merchants_24h"] == features["merchants_24h"], row["event_id"]
        assert row["txn_count_1m"] == features["txn_count_1m"]  # the stream's own columns as they were
    assert np.isfinite(frame["merchants_24h"]).all()
