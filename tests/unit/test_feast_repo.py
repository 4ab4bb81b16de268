"""The Feast definitions and feature_store.yaml generated from the shipped specs (no services)."""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from features.errors import ConfigError
from features.feast_repo import (
    OfflineSource,
    batch_source_name,
    config_yaml,
    definitions,
    feature_frame,
    project_name,
    redis_connection_string,
    ttl,
)
from features.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
SPECS = {name: load_spec(REPO / "pipelines" / f"{name}.yaml") for name in ("fraud", "sensors")}

EXPECTED = {
    "fraud": ("card", "card_id", [
        ("txn_count_1m", "Int64"), ("amount_sum_1h", "Float64"), ("amount_avg_24h", "Float64"),
        ("merchants_24h", "Int64"), ("secs_since_last", "Float64")]),
    "sensors": ("device", "device_id", [
        ("readings_5m", "Int64"), ("temp_avg_10m", "Float64"), ("temp_max_10m", "Float64"),
        ("temp_min_10m", "Float64"), ("vib_std_5m", "Float64"), ("rpm_last", "Float64"), ("sites_1h", "Int64"),
        ("vib_sum_1m", "Float64"), ("secs_since_last", "Float64")]),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_definitions_follow_the_spec(name, tmp_path):
    from feast import Entity, FeatureView, PushSource
    from feast.types import Float64, Int64, String

    spec = SPECS[name]
    entity_name, key, fields = EXPECTED[name]
    entity, push, view = definitions(spec, tmp_path)

    assert isinstance(entity, Entity) and entity.name == entity_name and entity.join_key == key
    assert isinstance(push, PushSource) and push.name == f"{name}_push"
    assert push.batch_source.timestamp_field == "event_time"
    assert isinstance(view, FeatureView) and view.name == name and view.online
    assert view.entities == [entity_name]
    assert [(f.name, f.dtype) for f in view.entity_columns] == [(key, String)]
    dtypes = {"Int64": Int64, "Float64": Float64}
    assert [(f.name, f.dtype) for f in view.features] == [(n, dtypes[t]) for n, t in fields]
    assert view.stream_source == push
    assert view.ttl >= timedelta(milliseconds=spec.max_window_ms)
    assert view.tags["eddy.spec_hash"] == spec.spec_hash


def test_ttl_is_the_longest_window_plus_the_allowed_lateness():
    assert ttl(SPECS["fraud"]) == timedelta(hours=24, seconds=30)
    assert ttl(SPECS["sensors"]) == timedelta(hours=1, seconds=10)


def test_a_spec_name_with_hyphen_and_dot_gives_a_project_feast_accepts(tmp_path):
    from dataclasses import replace

    from feast.repo_config import load_repo_config

    spec = replace(SPECS["fraud"], name="fraud-eu.v2")
    (tmp_path / "feature_store.yaml").write_text(config_yaml(spec, tmp_path, "redis://h:1/0"))
    assert load_repo_config(tmp_path, tmp_path / "feature_store.yaml").project == "fraud_eu_v2"


def test_feature_store_yaml(tmp_path):
    text = config_yaml(SPECS["fraud"], tmp_path, "redis://10.1.2.3:6380/4")
    config = yaml.safe_load(text)
    assert config["project"] == "fraud" == project_name(SPECS["fraud"])
    assert config["provider"] == "local"
    assert config["registry"]["path"] == str(tmp_path.resolve() / "registry.db")
    assert config["online_store"] == {"type": "redis", "connection_string": "10.1.2.3:6380,db=4"}
    assert config["entity_key_serialization_version"] == 3
    assert yaml.safe_load(config_yaml(SPECS["sensors"], tmp_path, "redis://h:1/0", project="p_1"))["project"] == "p_1"


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/0", {"host": "127.0.0.1", "port": "6379", "db": 0}),
    ("redis://:s3cret@redis.example:6390/2", {"host": "redis.example", "port": "6390", "db": 2, "password": "s3cret"}),
    # Characters Feast's format would otherwise break on: ',' splits, '=' and '$' expand, digits JSON-decode.
    ("rediss://eddy:p%2Cw%3D%24HOME%40x@10.0.0.5/7",
     {"host": "10.0.0.5", "port": "6379", "db": 7, "username": "eddy", "password": "p,w=$HOME@x", "ssl": True}),
    ("redis://:12345@h:1/3", {"host": "h", "port": "1", "db": 3, "password": "12345"}),
])
def test_redis_url_becomes_the_connection_string_feast_reads_back(url, expected, tmp_path):
    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.repo_config import load_repo_config

    (tmp_path / "feature_store.yaml").write_text(config_yaml(SPECS["fraud"], tmp_path, url))
    config = load_repo_config(tmp_path, tmp_path / "feature_store.yaml")
    nodes, params = RedisOnlineStore._parse_connection_string(config.online_store.connection_string)
    assert [{**nodes[0], **params}] == [expected]
    assert config.entity_key_serialization_version == 3


def test_password_and_db_in_the_connection_string():
    assert redis_connection_string("redis://user:pw@host:6381/5") == 'host:6381,db=5,username="user",password="pw"'
    assert "HOME" in os.environ  # the case above would have expanded $HOME had it not been escaped


@pytest.mark.parametrize("url", ["unix:///tmp/redis.sock", "redis://h:1/x"])
def test_unusable_urls_are_config_errors(url):
    with pytest.raises(ConfigError):
        redis_connection_string(url)


def test_feature_frame_types_columns_as_the_view():
    spec = SPECS["fraud"]
    rows = [{"txn_count_1m": 1, "amount_sum_1h": 12.5, "amount_avg_24h": 12.5, "merchants_24h": 1,
             "secs_since_last": None},
            {"txn_count_1m": 2, "amount_sum_1h": 20, "amount_avg_24h": 10.0, "merchants_24h": 2,
             "secs_since_last": 3.5}]
    frame = feature_frame(spec, ["c-1", "c-2"], [1795341600123, 1795341603623], rows)
    assert list(frame.columns) == ["card_id", "event_time", *spec.feature_names]
    assert str(frame["event_time"].dtype) == "datetime64[us, UTC]"
    assert frame["event_time"][0].isoformat() == "2026-11-22T10:00:00.123000+00:00"
    assert frame["txn_count_1m"].tolist() == [1, 2] and str(frame["txn_count_1m"].dtype) == "int64"
    assert frame["amount_sum_1h"].tolist() == [12.5, 20.0] and str(frame["amount_sum_1h"].dtype) == "float64"
    assert math.isnan(frame["secs_since_last"][0]) and frame["secs_since_last"][1] == 3.5
    with pytest.raises(TypeError):
        feature_frame(spec, ["c-1"], [0], [{**rows[0], "txn_count_1m": None}])


def test_an_offline_source_sets_the_offline_store_and_the_batch_source(tmp_path):
    from feast import FileSource
    from feast.repo_config import load_repo_config

    spec = SPECS["fraud"]
    made = []

    def batch_source(name, timestamp_field):
        made.append((name, timestamp_field))
        return FileSource(name=name, timestamp_field=timestamp_field, path="s3://lake/silver/features")

    offline = OfflineSource(store={"type": "file"}, batch_source=batch_source)
    text = config_yaml(spec, tmp_path, "redis://h:1/0", offline=offline)
    assert yaml.safe_load(text)["offline_store"] == {"type": "file"}
    (tmp_path / "feature_store.yaml").write_text(text)
    assert load_repo_config(tmp_path, tmp_path / "feature_store.yaml").offline_store.type == "file"
    _, push, view = definitions(spec, tmp_path, offline)
    assert made == [(batch_source_name(spec), "event_time")]
    assert push.batch_source.path == view.batch_source.path == "s3://lake/silver/features"
    # without one: Feast's default offline store and the parquet placeholder, as before
    assert "offline_store" not in yaml.safe_load(config_yaml(spec, tmp_path, "redis://h:1/0"))
    assert definitions(spec, tmp_path)[1].batch_source.path.endswith("fraud_features.parquet")
