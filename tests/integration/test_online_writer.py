"""The online writer through the real broker, redis-server and Feast: each entity's latest non-late
row lands in the online store, read back through the Feast SDK and `eddy features get`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import orjson
import pytest
import redis
import yaml
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from features.feast_repo import online_features, open_feature_store
from features.spec import parse_spec
from features.validation import Validator
from features.waiting import poll
from streams.featurize import Featurizer
from streams.kafka import ensure_topics
from streams.metrics import read_metrics
from streams.online_writer import group_id, run_online_writer
from tests.conftest import run_eddy
from tests.kafka_helpers import Background

T0 = 1795341600000  # 2026-11-22T10:00:00Z
# (card, seconds after T0, merchant, amount): out of order in time, late rows (allowed lateness
# is 30 s) and a non-late row older than its entity's newest. c-4 has one event: a null feature.
EVENTS = [
    ("c-1", 0, "m-1", 10.0), ("c-2", 1, "m-1", 5.5), ("c-1", 20, "m-2", 2.25), ("c-3", 50, "m-3", 7.0),
    ("c-2", 2, "m-2", 1.0), ("c-1", 5, "m-3", 100.0), ("c-3", 10, "m-1", 3.0), ("c-4", 7, "m-9", 42.0),
    ("c-1", -60, "m-1", 9.0), ("c-2", 3, "m-2", 0.5), ("c-5", 0, "m-5", 1.5), ("c-5", 10, "m-6", 2.5),
    ("c-5", 9, "m-7", 3.5), ("c-5", -25, "m-8", 4.5),
]


def private_spec(settings, tmp_path: Path, topics: bool = True):
    """The fraud spec with a name and topics of this test's own (created unless not `topics`), also
    written to a file for the CLI."""
    data = yaml.safe_load(settings.pipeline.read_text())
    suffix = uuid.uuid4().hex[:8]
    data["name"] = f"fraud-{suffix}"
    data["source"]["topic"] = f"tx-{suffix}"
    data["topics"] = {"features": f"feat-{suffix}", "predictions": f"pred-{suffix}", "dlq": f"tx-{suffix}.dlq",
                      "model_updates": f"mu-{suffix}"}
    spec = parse_spec(data)
    if topics:
        ensure_topics(settings.kafka, [spec.topics.features], partitions=3)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return spec, path


def feature_rows(spec) -> list[dict]:
    """The features-topic values the engines produce for EVENTS (the shared Featurizer, in order)."""
    validator, featurize, states, rows = Validator(spec), Featurizer(spec), {}, []
    for i, (card, dt, merchant, amount) in enumerate(EVENTS):
        raw = orjson.dumps({"event_id": f"e-{i}", "event_time": T0 + dt * 1000, "card_id": card,
                            "merchant_id": merchant, "amount": amount, "currency": "EUR", "country": "DE",
                            "channel": "online"})
        event = validator.parse(raw)
        new_state, value = featurize.apply_bytes(states.get(event.key), event, None)
        if new_state is not None:
            states[event.key] = new_state
        rows.append(orjson.loads(value))
    return rows


def expected_latest(rows: list[dict]) -> dict[str, dict]:
    """Per card: the features of the non-late row with the latest event time."""
    best: dict[str, dict] = {}
    for row in rows:
        if not row["late"] and (row["card_id"] not in best or row["event_time"] >= best[row["card_id"]]["event_time"]):
            best[row["card_id"]] = row
    return {card: row["features"] for card, row in best.items()}


def produce_in_transaction(kafka, topic: str, rows: list[dict], extra: list[tuple[bytes, bytes]] = ()) -> None:
    """As the engines do: keyed by the entity, in a transaction (so the topic holds commit markers)."""
    producer = Producer(kafka.client(**{"transactional.id": f"test-{uuid.uuid4().hex[:8]}"}))
    producer.init_transactions(30)
    producer.begin_transaction()
    for row in rows:
        producer.produce(topic, value=orjson.dumps(row), key=row["card_id"].encode())
    for key, value in extra:
        producer.produce(topic, value=value, key=key)
    producer.commit_transaction(30)


def bad_records(rows: list[dict]) -> list[tuple[bytes, bytes]]:
    """Records the writer must skip and count: not JSON, and a row of c-6 with a null count."""
    broken = {**rows[0], "card_id": "c-6", "features": {**rows[0]["features"], "txn_count_1m": None}}
    return [(b"c-1", b"not json"), (b"c-6", orjson.dumps(broken))]


def wait_for_zero_lag(kafka, group: str, topic: str, timeout_s: float = 90.0) -> None:
    """Until the group's committed offset is each partition's end offset (commit markers included)."""
    probe = Consumer(kafka.client(**{"group.id": group, "enable.auto.commit": False}))
    try:
        partitions = [TopicPartition(topic, p) for p in probe.list_topics(topic, timeout=10).topics[topic].partitions]
        committed: dict[int, int] = {}
        ends: dict[int, int] = {}

        def caught_up() -> bool:
            try:
                committed.update({tp.partition: tp.offset for tp in probe.committed(partitions, timeout=10)})
            except KafkaException:  # the group coordinator of a fresh broker may still be loading
                return False
            ends.update({tp.partition: probe.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions})
            return all(ends[p] == 0 or committed[p] == ends[p] for p in ends)

        if not poll(caught_up, timeout_s):
            raise AssertionError(f"lag of {group} on {topic} not 0 after {timeout_s}s: committed {committed}, ends {ends}")
    finally:
        probe.close()


def write_all(settings, spec, repo_dir: Path, project: str | None, batch_size: int) -> None:
    writer = Background(lambda stop: run_online_writer(settings.kafka, spec, settings.redis_url, repo_dir, stop,
                                                       project=project, batch_size=batch_size))
    try:
        wait_for_zero_lag(settings.kafka, group_id(spec), spec.topics.features)
    finally:
        writer.stop()


@pytest.mark.kafka
@pytest.mark.redis
@pytest.mark.parametrize("batch_size", [2000, 1])
def test_each_entity_gets_its_latest_non_late_row(settings, tmp_path, batch_size):
    """Batches of 2000 pick the newest row per entity themselves; batches of 1 rely on Feast's Redis
    store skipping a row older than the stored one."""
    spec, _ = private_spec(settings, tmp_path)
    rows = feature_rows(spec)
    assert sum(r["late"] for r in rows) == 3 and {r["card_id"] for r in rows} == {"c-1", "c-2", "c-3", "c-4", "c-5"}
    produce_in_transaction(settings.kafka, spec.topics.features, rows, bad_records(rows))
    repo_dir = tmp_path / "home" / "feast"

    write_all(settings, spec, repo_dir, f"test_{uuid.uuid4().hex[:8]}", batch_size)

    expected = expected_latest(rows)
    assert expected["c-1"]["txn_count_1m"] == 2 and expected["c-4"]["secs_since_last"] is None
    cards = sorted(expected) + ["c-6", "c-nobody"]
    got = online_features(open_feature_store(repo_dir), spec, cards)
    assert dict(zip(cards, got, strict=True)) == {**expected, "c-6": None, "c-nobody": None}
    beats = read_metrics(redis.Redis.from_url(settings.redis_url), spec.name, "online-writer", max_age_s=60)
    assert len(beats) == 1
    assert (beats[0]["events"], beats[0]["late"], beats[0]["bad"]) == (len(rows) + 2, 3, 2)


@pytest.mark.kafka
@pytest.mark.redis
def test_eddy_features_get_prints_the_latest_values(settings, stack_env, tmp_path):
    spec, spec_path = private_spec(settings, tmp_path)
    rows = feature_rows(spec)
    produce_in_transaction(settings.kafka, spec.topics.features, rows)
    home = tmp_path / "home"
    env = {**stack_env, "EDDY_HOME": str(home), "EDDY_PIPELINE": str(spec_path)}

    result = run_eddy(["features", "get", "c-1"], env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"eddy: error: Feast is not set up under {home / 'feast'}; run `eddy up` (its online writer sets it up)"]

    write_all(settings, spec, home / "feast", None, 2000)  # the project derived from the spec's name
    expected = expected_latest(rows)

    result = run_eddy(["features", "get", "c-1", "--json"], env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"card_id": "c-1", "features": expected["c-1"]}

    result = run_eddy(["features", "get", "c-4"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "card_id c-4"
    assert {line.split()[0]: line.split()[1] for line in lines[1:]} == {
        name: "null" if value is None else str(value) for name, value in expected["c-4"].items()}

    result = run_eddy(["features", "get", "c-nobody"], env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"eddy: error: no features for card_id 'c-nobody' in the online store (pipeline {spec.name!r}): "
        "no event of it has been processed yet"]


@pytest.mark.redis
def test_the_fast_writer_stores_what_feasts_own_writer_stores(redis_settings, tmp_path):
    """The same rows through FeatureStore.write_to_online_store and through FeastRedisWriter leave
    byte-identical Redis hashes (Feast's key, field hashes, ValueProto and Timestamp bytes, nulls)."""
    from features.feast_repo import feature_dtypes, feature_frame, feature_store, view_name
    from streams.feast_redis import FeastRedisWriter

    spec, _ = private_spec(redis_settings, tmp_path, topics=False)
    latest = expected_latest(feature_rows(spec))
    cards = sorted(latest)
    event_ms = [T0 + 1000 * i + 7 for i in range(len(cards))]
    features = [latest[c] for c in cards]
    assert any(v is None for f in features for v in f.values())  # a null travels too
    client = redis.Redis.from_url(redis_settings.redis_url)

    def stored(project: str, write) -> list[dict]:
        store = feature_store(spec, tmp_path / project, redis_settings.redis_url, project=project)
        writer = FeastRedisWriter(store, view_name(spec), spec.key, feature_dtypes(spec), client)
        write(store, writer)
        return [client.hgetall(writer.redis_key(c)) for c in cards]

    feasts = stored(f"ref_{uuid.uuid4().hex[:8]}", lambda store, _: store.write_to_online_store(
        view_name(spec), feature_frame(spec, cards, event_ms, features)))
    ours = stored(f"fast_{uuid.uuid4().hex[:8]}", lambda _, writer: writer.write(cards, event_ms, features))
    assert all(len(h) == len(spec.features) + 1 for h in feasts)
    assert ours == feasts


@pytest.mark.redis
def test_the_fast_writer_keeps_a_newer_stored_row_and_refuses_a_null_count(redis_settings, tmp_path):
    from features.feast_repo import feature_dtypes, feature_store, view_name
    from streams.feast_redis import FeastRedisWriter

    spec, _ = private_spec(redis_settings, tmp_path, topics=False)
    project = f"t_{uuid.uuid4().hex[:8]}"
    store = feature_store(spec, tmp_path / "repo", redis_settings.redis_url, project=project)
    writer = FeastRedisWriter(store, view_name(spec), spec.key, feature_dtypes(spec),
                              redis.Redis.from_url(redis_settings.redis_url))
    row = {"txn_count_1m": 3, "amount_sum_1h": 10.5, "amount_avg_24h": 3.5, "merchants_24h": 2,
           "secs_since_last": 1.25}
    assert writer.write(["c-1"], [T0 + 5000], [row]) == 1
    assert writer.write(["c-1"], [T0 + 5000], [{**row, "txn_count_1m": 9}]) == 0  # same time: kept
    assert writer.write(["c-1"], [T0 + 4999], [{**row, "txn_count_1m": 9}]) == 0  # older: kept
    assert online_features(store, spec, ["c-1"]) == [row]
    assert writer.write(["c-1"], [T0 + 5001], [{**row, "txn_count_1m": 4, "secs_since_last": None}]) == 1
    assert online_features(store, spec, ["c-1"]) == [{**row, "txn_count_1m": 4, "secs_since_last": None}]
    with pytest.raises(TypeError, match="txn_count_1m"):
        writer.write(["c-2"], [T0], [{**row, "txn_count_1m": None}])
    assert online_features(store, spec, ["c-2"]) == [None]
