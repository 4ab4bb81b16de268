"""Lakehouse ingestion as `eddy up` runs it (`eddy run lakehouse`): every committed Kafka record of
each topic lands once in its Delta table, also across a kill -9; `eddy query` and delta-rs agree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
import yaml

from lakehouse.ingest import CONCURRENT_WRITER
from tests.conftest import EDDY, REPO, run_eddy
from tests.kafka_helpers import produce_all
from tests.parity import make_stream, valid_record
from tests.stack_helpers import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.spark, pytest.mark.slow]

FEATURES_PER_ROUND = 600
ABORTED = 150


def private_spec(settings, into: Path):
    """The fraud spec on topics of this test's own (every topic ingestion reads)."""
    from features.spec import parse_spec
    from streams.kafka import ensure_topics

    data = yaml.safe_load((REPO / "pipelines" / "fraud.yaml").read_text())
    suffix = uuid.uuid4().hex[:8]
    data["name"] = f"lake-{suffix}"
    data["source"]["topic"] = f"transactions-{suffix}"
    data["labels"]["topic"] = f"labels-{suffix}"
    data["topics"] = {"features": f"features-{suffix}", "predictions": f"predictions-{suffix}",
                      "dlq": f"dlq-{suffix}", "model_updates": f"updates-{suffix}"}
    spec = parse_spec(data)
    # make_stream's records carry the Kafka timestamps of their history (days ago): kept forever, so the
    # broker's retention (7 days by default, checked every 5 minutes) never deletes them mid-test
    ensure_topics(settings.kafka, spec.topics.all(), partitions=3, configs={"retention.ms": "-1"})
    into.write_text(yaml.safe_dump(data))
    return spec


class Round:
    """One round of records on every topic; remembers the (partition, offset) of each committed one."""

    def __init__(self, settings, spec, seed: int) -> None:
        self.settings, self.spec, self.seed = settings, spec, seed
        self.positions: dict[str, set[tuple[int, int]]] = {}
        self.valid: dict[tuple[int, int], dict] = {}   # (partition, offset) -> the valid source record there

    def produce(self) -> None:
        spec, kafka = self.spec, self.settings.kafka
        stream = make_stream(spec, self.seed, entities=5, per_entity=30)
        delivered = produce_all(kafka, spec.topics.source, stream)
        self._keep(spec.topics.source, delivered)
        for (_key, value, _stamp), msg in zip(stream, delivered, strict=True):
            record = valid_record(spec, value)
            if record is not None:
                self.valid[(msg.partition(), msg.offset())] = record
        labels = [(r["event_id"].encode(), orjson.dumps({"event_id": r["event_id"], "is_fraud": i % 7 == 0,
                                                         "label_time": "2026-11-22T10:00:00Z"}))
                  for i, r in enumerate(self.valid.values())]
        self._keep(spec.labels.topic, produce_all(kafka, spec.labels.topic, labels))
        letters = [(b"k", b"\xff\xfe not json %d" % i) for i in range(5)]
        headers = [("eddy.error", b"not JSON"), ("eddy.stage", b"features"),
                   ("eddy.source.topic", spec.topics.source.encode()), ("eddy.source.partition", b"1"),
                   ("eddy.source.offset", b"42")]
        self._keep(spec.topics.dlq, produce_all(kafka, spec.topics.dlq, letters, headers=headers))
        self._transactional(spec.topics.features, self._features, FEATURES_PER_ROUND)
        self._transactional(spec.topics.predictions, self._prediction, FEATURES_PER_ROUND)

    def _features(self, i: int) -> dict:
        return {"event_id": f"r{self.seed}-{i}", "card_id": f"c-{i % 9}", "event_time": 1_795_000_000_000 + i,
                "features": {"txn_count_1m": i % 5, "amount_sum_1h": i * 1.5, "amount_avg_24h": 2.0,
                             "merchants_24h": 1, "secs_since_last": None if i % 10 == 0 else 3.25},
                "late": i % 50 == 0}

    def _prediction(self, i: int) -> dict:
        return {**self._features(i), "score": (i % 100) / 100, "model_version": f"v{i % 2}",
                "scored_at": "2026-11-22T10:00:01.5+01:00"}

    def _transactional(self, topic: str, make, count: int) -> None:
        """`count` records in a committed transaction, then ABORTED more in an aborted one, which no
        read_committed reader (ingestion included) may see."""
        from confluent_kafka import Producer

        producer = Producer(self.settings.kafka.client(**{"transactional.id": f"test-{uuid.uuid4().hex}"}))
        producer.init_transactions()
        delivered = []
        producer.begin_transaction()
        for i in range(count):
            producer.produce(topic, orjson.dumps(make(i)), f"c-{i % 9}".encode(),
                             on_delivery=lambda err, msg: delivered.append(msg))
        producer.commit_transaction()
        producer.begin_transaction()
        for i in range(ABORTED):
            producer.produce(topic, orjson.dumps(make(10_000 + i)), b"x")
        producer.flush()
        producer.abort_transaction()
        self._keep(topic, delivered)

    def _keep(self, topic: str, delivered: list) -> None:
        self.positions.setdefault(topic, set()).update((m.partition(), m.offset()) for m in delivered)


def delta_rows(lake: Path, path: str):
    from lakehouse.snapshot import read_snapshot

    return read_snapshot(str(lake / path)).to_pandas()


def landed_rows(lake: Path, path: str) -> int:
    """Rows in a table, 0 while ingestion is still creating it."""
    from deltalake.exceptions import TableNotFoundError

    try:
        return len(delta_rows(lake, path))
    except TableNotFoundError:
        return 0


def start_ingestion(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([*EDDY, "run", "lakehouse"], env={**os.environ, **env}, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_every_record_lands_once_across_a_kill_9_and_queries_agree(settings, stack_env, tmp_path):
    from lakehouse.tables import ingested_tables

    spec = private_spec(settings, tmp_path / "spec.yaml")
    lake = tmp_path / "lake"
    env = {**stack_env, "EDDY_PIPELINE": str(tmp_path / "spec.yaml"), "EDDY_LAKEHOUSE": str(lake),
           "EDDY_INGEST_TRIGGER": "1s"}
    tables = {t.topic: t for t in ingested_tables(spec)}
    rounds = [Round(settings, spec, seed) for seed in (3, 4)]
    rounds[0].produce()

    writers = [start_ingestion(env, tmp_path / "ingest.out")]
    try:
        # Kill it once the first round is landing: some tables committed, others (likely) mid-batch.
        wait_for(lambda: any(landed_rows(lake, t.path) for t in tables.values()), 180, "the first rows in Delta")
        rounds[1].produce()
        os.killpg(writers[0].pid, signal.SIGKILL)
        writers[0].wait(30)
        # Then two writers with one query id (the same checkpoints): the restart, and a twin started beside it.
        # Delta refuses a writer's commit of a batch the other committed (the query id and batch id are the
        # transaction's app id and version), or Spark's checkpoint refuses a batch the other logged first, and
        # the writer that lost stops with that one line. Each runs a
        # query per table, so both may lose, on different tables; then one is started again, as supervision does.
        writers += [start_ingestion(env, tmp_path / "ingest.out"), start_ingestion(env, tmp_path / "twin.out")]

        def landed() -> bool:
            if all(w.poll() is not None for w in writers[1:]):
                writers.append(start_ingestion(env, tmp_path / "ingest.out"))
            return all(landed_rows(lake, t.path) >= sum(len(r.positions[topic]) for r in rounds)
                       for topic, t in tables.items())
        wait_for(landed, 300, "both rounds in every table")
        time.sleep(5)  # a batch a writer might still be committing
        exits = [w.poll() for w in writers[1:]]
    finally:
        for running in writers:
            if running.poll() is None:
                os.killpg(running.pid, signal.SIGTERM)
            running.wait(60)
    stopped = [code for code in exits if code is not None]
    assert all(code == 1 for code in stopped), exits  # a writer stops only when Delta refuses it, in one line
    lines = [line for name in ("ingest", "twin") for line in (tmp_path / f"{name}.out").read_text().splitlines()
             if line.startswith("eddy: error:")]
    # refused by Delta's commit, or before it by Spark's checkpoint log (the batch's file exists, or its rename raced)
    assert all(CONCURRENT_WRITER in line for line in lines), lines
    print(f"two writers with one query id: {len(stopped)} of {len(exits)} stopped, each refused in one line")

    for topic, table in tables.items():
        frame = delta_rows(lake, table.path)
        got = list(zip(frame["kafka_partition"], frame["kafka_offset"], strict=True))
        want = set().union(*(r.positions[topic] for r in rounds))
        assert len(got) == len(set(got)), f"{table.path}: a record landed twice"
        assert {(int(p), int(o)) for p, o in got} == want, f"{table.path}: not exactly the committed records"
        assert set(frame["kafka_topic"]) == {topic}

    features = delta_rows(lake, "silver/features")
    assert len(features) == 2 * FEATURES_PER_ROUND  # nothing of the aborted transactions
    row = features[features["event_id"] == "r3-10"].iloc[0]
    assert (row["txn_count_1m"], row["amount_sum_1h"], row["merchants_24h"]) == (0, 15.0, 1)
    assert row["secs_since_last"] != row["secs_since_last"]  # a null feature stays null (NaN)
    assert int(row["event_time"].timestamp() * 1000) == 1_795_000_000_010
    assert features["late"].sum() == 2 * len(range(0, FEATURES_PER_ROUND, 50))
    predictions = delta_rows(lake, "gold/predictions")
    assert sorted(Counter(predictions["model_version"]).items()) == [("v0", FEATURES_PER_ROUND), ("v1", FEATURES_PER_ROUND)]
    assert str(predictions["scored_at"].iloc[0]).startswith("2026-11-22 09:00:01.5")
    letters = delta_rows(lake, "bronze/dlq")
    assert set(letters["error"]) == {"not JSON"} and set(letters["source_offset"]) == {42}
    assert letters["value"].iloc[0].startswith(b"\xff\xfe not json")

    # eddy query over the same tables: Spark's answer, delta-rs's answer and the produced records agree
    # (on the valid records, picked out by their Kafka position).
    source = tables[spec.topics.source]
    valid = {pos: r for rnd in rounds for pos, r in rnd.valid.items()}
    positions = ", ".join(f"'{p}:{o}'" for p, o in sorted(valid))
    statement = (f"SELECT channel, count(*) AS n, round(sum(amount), 4) AS total FROM {source.sql_name} "
                 f"WHERE concat(kafka_partition, ':', kafka_offset) IN ({positions}) GROUP BY channel ORDER BY channel")
    result = run_eddy(["query", statement, "--format", "json"], env, timeout=240)
    assert result.returncode == 0, result.stderr
    answer = [json.loads(line) for line in result.stdout.splitlines()]
    bronze = delta_rows(lake, source.path)
    bronze = bronze[[(int(p), int(o)) in valid for p, o in zip(bronze["kafka_partition"], bronze["kafka_offset"], strict=True)]]
    by_delta_rs = bronze.groupby("channel")["amount"].agg(["count", "sum"])
    produced, totals = Counter(r["channel"] for r in valid.values()), Counter()
    for r in valid.values():
        totals[r["channel"]] += r["amount"]
    assert [a["channel"] for a in answer] == sorted(produced) == sorted(by_delta_rs.index)
    for a in answer:
        assert a["n"] == produced[a["channel"]] == by_delta_rs.loc[a["channel"], "count"]
        assert a["total"] == pytest.approx(totals[a["channel"]], abs=1e-3)
        assert by_delta_rs.loc[a["channel"], "sum"] == pytest.approx(totals[a["channel"]], abs=1e-3)

    bad = run_eddy(["query", f"SELECT nope FROM {source.sql_name}"], env, timeout=240)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "UNRESOLVED_COLUMN" in bad.stderr and "at org.apache" not in bad.stderr

    # Maintenance: compaction keeps every row and leaves fewer files; a retention that could delete an
    # in-flight write's files is refused in one line before Spark starts.
    import deltalake

    counts = {t.path: len(delta_rows(lake, t.path)) for t in tables.values()}
    files_before = len(deltalake.DeltaTable(str(lake / "silver/features")).file_uris())
    optimized = run_eddy(["lakehouse", "optimize"], env, timeout=300)
    assert optimized.returncode == 0, optimized.stderr
    assert "silver.features" in optimized.stdout and "compacted" in optimized.stdout
    assert {t.path: len(delta_rows(lake, t.path)) for t in tables.values()} == counts
    assert len(deltalake.DeltaTable(str(lake / "silver/features")).file_uris()) < files_before
    refused = run_eddy(["lakehouse", "vacuum", "--retain", "0.5"], env)
    assert refused.returncode == 2 and "keep at least 1 hour" in refused.stderr and refused.stderr.count("\n") == 1
