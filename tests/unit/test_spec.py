"""The pipeline spec: the shipped specs load, defaults apply, every mistake names its field."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from features.errors import SpecError
from features.spec import Feature, Field, PipelineSpec, load_spec, parse_duration, parse_spec

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


@pytest.fixture
def fraud() -> dict:
    return yaml.safe_load((PIPELINES / "fraud.yaml").read_text())


def test_fraud_spec_loads_with_everything_derived():
    spec = load_spec(PIPELINES / "fraud.yaml")
    assert (spec.name, spec.entity, spec.key, spec.id_field, spec.timestamp_field) == (
        "fraud", "card", "card_id", "event_id", "event_time")
    assert spec.allowed_lateness_ms == 30_000
    assert spec.schema[:2] == (Field("event_id", "string"), Field("event_time", "timestamp"))
    assert spec.field_types["amount"] == "double" and len(spec.field_types) == 8
    assert spec.features[1] == Feature("amount_sum_1h", "sum", "amount", 3_600_000)
    assert spec.features[4] == Feature("secs_since_last", "time_since_last", None, None)
    assert spec.feature_names == spec.model_inputs == (
        "txn_count_1m", "amount_sum_1h", "amount_avg_24h", "merchants_24h", "secs_since_last")
    assert spec.max_window_ms == 86_400_000 and spec.state_horizon_ms == 86_430_000
    assert spec.topics.all() == ("transactions", "labels", "features", "predictions", "predictions.shadow",
                                 "transactions.dlq", "model-updates")
    assert (spec.labels.topic, spec.labels.id, spec.labels.label) == (
        "labels", "event_id", "is_fraud")
    assert (spec.model.name, spec.model.kind) == ("fraud", "mlp")
    assert len(spec.spec_hash) == 64 and int(spec.spec_hash, 16) >= 0


def test_sensors_spec_loads_with_its_own_topics():
    spec = load_spec(str(PIPELINES / "sensors.yaml"))
    assert (spec.entity, spec.key, spec.timestamp_field) == ("device", "device_id", "ts")
    assert spec.topics.features == "sensor-features"
    assert spec.topics.dlq == "readings.dlq"  # not named in the file: the default
    assert spec.field_types["rpm"] == "long"
    assert spec.max_window_ms == 3_600_000 and spec.state_horizon_ms == 3_610_000
    assert len(spec.feature_names) == 9


def test_spec_is_frozen():
    spec = load_spec(PIPELINES / "fraud.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]


def test_topic_defaults_and_optional_labels(fraud):
    del fraud["topics"], fraud["labels"]
    spec = parse_spec(fraud)
    assert spec.labels is None and spec.topics.labels is None
    assert spec.topics.all() == ("transactions", "features", "predictions", "predictions.shadow",
                                 "transactions.dlq", "model-updates")


def test_partial_topics_keep_the_other_defaults(fraud):
    fraud["topics"] = {"predictions": "scores"}
    topics = parse_spec(fraud).topics
    assert (topics.features, topics.predictions, topics.dlq) == (
        "features", "scores", "transactions.dlq")


@pytest.mark.parametrize(("text", "ms"), [
    ("500ms", 500), ("30s", 30_000), ("1m", 60_000), ("1h", 3_600_000), ("24h", 86_400_000),
    ("7d", 604_800_000), (" 2s ", 2_000), (250, 250), ("0s", 0)])
def test_parse_duration(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["1.5h", "", "-1s", "h", "10", "1w", "1 hour", None, True, -5])
def test_parse_duration_refuses(text):
    with pytest.raises(SpecError, match="duration|negative"):
        parse_duration(text)


def _set(path: str, value):
    """A change to the fraud spec: set `value` at a dotted path (DELETE removes the key)."""
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            data = data[int(p)] if p.isdigit() else data[p]
        if value is DELETE:
            del data[int(last) if last.isdigit() else last]
        elif last.isdigit():
            data[int(last)] = value
        else:
            data[last] = value
    return change


DELETE = object()

BAD_SPECS = [
    ("features.2.agg", "median", "features[2].agg: 'median' is not one of count, sum, avg"),
    ("topic", "x", "topic: unknown key; allowed: name, entity"),
    ("features.0.windw", "1m", "features[0].windw: unknown key; allowed: name, agg, of, window"),
    ("source.scheme", {}, "source.scheme: unknown key"),
    ("model", DELETE, "model: required key is missing"),
    ("entity.key", DELETE, "entity.key: required key is missing"),
    ("features.1.of", DELETE, "features[1].of: required for sum"),
    ("features.1.of", "amt", "features[1].of: 'amt' is not a field of source.schema"),
    ("features.1.of", "merchant_id", "features[1].of: sum needs a numeric field"),
    ("features.0.of", "amount", "features[0].of: count takes no 'of'"),
    ("features.4.of", "amount", "features[4].of: time_since_last takes no 'of'"),
    ("features.0.window", DELETE, "features[0].window: required for count"),
    ("features.0.window", "5 minutes", "features[0].window: '5 minutes' is not a duration"),
    ("features.0.window", "0s", "features[0].window: a window must be longer than 0"),
    ("features.4.window", "1h", "features[4].window: time_since_last has no window"),
    ("features.1.name", "txn_count_1m", "features[1].name: 'txn_count_1m' is already the name"),
    ("features.1.name", "amount sum", "features[1].name: 'amount sum' is not a valid name"),
    ("features.1.name", "card_id", "features[1].name: 'card_id' is reserved"),
    ("features.1.name", 7, "features[1].name: expected a string, got int"),
    ("features", [], "features: expected a non-empty list"),
    ("features.0", "count", "features[0]: expected a mapping"),
    ("entity.key", "pan", "entity.key: 'pan' is not a field of source.schema"),
    ("source.id", "txn_id", "source.id: 'txn_id' is not a field of source.schema"),
    ("source.timestamp", "card_id", "source.timestamp: field 'card_id' is string"),
    ("source.schema.amount", "decimal", "source.schema.amount: 'decimal' is not one of string"),
    ("source.schema", {}, "source.schema: expected a mapping of field name to type"),
    ("source.allowed_lateness", "soon", "source.allowed_lateness: 'soon' is not a duration"),
    ("source.topic", "bad topic", "source.topic: 'bad topic' is not a valid name"),
    ("model.kind", "gbm", "model.kind: 'gbm' is not one of mlp, sequence"),
    ("labels.label", DELETE, "labels.label: required key is missing"),
    ("topics.predictions", "features", "topics.predictions: 'features' is already the features"),
    ("topics.dlq", "transactions", "topics.dlq: 'transactions' is already the source topic"),
    ("topics.source", "x", "topics.source: unknown key; allowed: features, predictions"),
    ("entity", "card", "entity: expected a mapping with keys name, key, got str"),
    ("source.schema.channel", {"enum": []}, "source.schema.channel.enum: expected a non-empty list of strings"),
    ("source.schema.channel", {"enum": ["pos", 3]}, "source.schema.channel.enum: 3 is not a non-empty string"),
    ("source.schema.channel", {"enum": ["pos", "pos"]}, "source.schema.channel.enum: a value is listed twice"),
    ("source.schema.channel", {"values": ["pos"]}, "source.schema.channel.values: unknown key; allowed: enum"),
    ("source.max_record_bytes", "big", "source.max_record_bytes: 'big' is not a size"),
    ("source.max_record_bytes", 100, "source.max_record_bytes: 100 bytes is below the least bound of 1KiB"),
    ("source.extra_fields", "keep", "source.extra_fields: 'keep' is not one of ignore, refuse"),
    ("guarantee", "sometimes", "guarantee: 'sometimes' is not one of exactly_once, at_least_once"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD_SPECS,
                         ids=[f"{p}={v!r}"[:40] for p, v, _ in BAD_SPECS])
def test_each_mistake_names_its_field(fraud, path, value, message):
    _set(path, value)(fraud)
    with pytest.raises(SpecError) as err:
        parse_spec(fraud, source="fraud.yaml")
    text = str(err.value)
    assert text.startswith("fraud.yaml: ") and message in text and "\n" not in text


def test_top_level_must_be_a_mapping():
    with pytest.raises(SpecError, match="<spec>: spec: expected a mapping"):
        parse_spec(["name"])  # type: ignore[arg-type]


def test_load_spec_names_the_path_when_missing(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=f"{missing}: cannot read the pipeline spec"):
        load_spec(missing)


@pytest.mark.parametrize(("text", "message"), [
    ("name: [unclosed", "not valid YAML: line"),
    ("name: a\nname: b\n", "duplicate key 'name'"),
    ("- just\n- a list\n", "spec: expected a mapping"),
])
def test_load_spec_names_the_path_on_bad_yaml(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def _reverse_keys(value):
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reverse_keys(v) for v in value]
    return value


def test_spec_hash_is_stable_across_key_order(fraud):
    assert parse_spec(_reverse_keys(fraud)).spec_hash == parse_spec(fraud).spec_hash
    assert parse_spec(fraud).spec_hash == load_spec(PIPELINES / "fraud.yaml").spec_hash


def test_spec_hash_is_stable_across_equal_spellings(fraud):
    other = copy.deepcopy(fraud)
    other["features"][0]["window"] = "60s"
    other["source"]["allowed_lateness"] = 30_000
    other["source"]["max_record_bytes"] = "64KiB"  # the default, spelled out
    other["source"]["extra_fields"] = "ignore"  # the default
    assert parse_spec(other).spec_hash == parse_spec(fraud).spec_hash


def test_record_bounds_enums_and_the_extra_fields_rule(fraud):
    fraud["source"]["max_record_bytes"] = "2 MiB"
    fraud["source"]["extra_fields"] = "refuse"
    spec = parse_spec(fraud)
    assert (spec.max_record_bytes, spec.extra_fields) == (2 * 1024 * 1024, "refuse")
    assert spec.enums == {"channel": ("online", "pos", "atm")} and spec.field_types["channel"] == "string"


@pytest.mark.parametrize(("path", "value"), [
    ("features.1.window", "2h"), ("features.1.agg", "avg"), ("features.1.name", "amt_1h"),
    ("source.allowed_lateness", "1m"), ("model.kind", "sequence"), ("source.max_record_bytes", 4096),
    ("source.extra_fields", "refuse"), ("source.schema.channel", {"enum": ["online", "pos"]}),
    ("source.schema.channel", "string")])
def test_spec_hash_changes_with_the_spec(fraud, path, value):
    before = parse_spec(fraud).spec_hash
    _set(path, value)(fraud)
    assert parse_spec(fraud).spec_hash != before


def test_reordering_features_changes_the_hash_and_model_inputs(fraud):
    before = parse_spec(fraud)
    fraud["features"].reverse()
    after = parse_spec(fraud)
    assert after.spec_hash != before.spec_hash
    assert after.model_inputs == tuple(reversed(before.model_inputs))


def test_a_spec_with_no_windowed_feature_has_horizon_of_lateness(fraud):
    fraud["features"] = [{"name": "gap", "agg": "time_since_last"}]
    spec: PipelineSpec = parse_spec(fraud)
    assert spec.max_window_ms == 0 and spec.state_horizon_ms == 30_000


def test_the_guarantee_is_exactly_once_unless_chosen_and_keeps_the_hash(fraud):
    plain = parse_spec(fraud)
    assert plain.guarantee == "exactly_once"
    fraud["guarantee"] = "at_least_once"
    chosen = parse_spec(fraud)
    assert chosen.guarantee == "at_least_once" and chosen.spec_hash == plain.spec_hash
