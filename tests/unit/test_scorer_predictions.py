"""The scorer's predictions, with no broker: the bytes it writes parse to the contract's message (the
features record's own fields, its score, model version and scoring time), the same whichever way
they were built; a record it cannot read goes to the DLQ."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import torch
from hypothesis import given
from hypothesis import strategies as st

from features.spec import load_spec
from models.baseline import baseline_model
from models.scorer import Scorer, ScorerConfig, prediction, splice_applies, splice_predictions
from models.scoring import LoadedModel
from models.signing import SigningKey
from streams.kafka import KafkaConfig
from streams.loop import HeldRecord

SPEC = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "fraud.yaml")


class Out:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    def produce(self, topic, value=None, key=None, *args, headers=None, **kwargs):
        self.records.append((topic, value, key, headers))


def scorer() -> Scorer:
    torch.manual_seed(0)
    s = Scorer(ScorerConfig(KafkaConfig("127.0.0.1:1"), SPEC, "redis://127.0.0.1:1/0", "cpu", SigningKey.generate().public()), redis_client=None)
    model, normaliser = baseline_model(SPEC)
    s.serving = LoadedModel(model, normaliser, SimpleNamespace(version="v7"), device="cpu")
    return s


def features_record(i: int, **extra) -> dict:
    return {"event_id": f"e-{i}", "card_id": "c-1", "event_time": "2026-11-22T10:00:00.123Z",
            "features": {"txn_count_1m": i, "amount_sum_1h": 10.0 * i, "amount_avg_24h": 5.0,
                         "merchants_24h": 1, "secs_since_last": None if i == 0 else 1.5},
            "late": False, **extra}


def test_predictions_carry_the_record_its_score_version_and_time():
    s, out = scorer(), Out()
    plain = [features_record(i) for i in range(3)]
    spaced = features_record(3)
    tricky = features_record(4, score=0.99)  # a field of its own called score must not shadow ours
    values = [orjson.dumps(r) for r in plain] + [b"  " + orjson.dumps(spaced), orjson.dumps(tricky)]
    s.process([HeldRecord(v, b"c-1", "features", 0, i) for i, v in enumerate(values)], out)
    assert [(t, k) for t, _, k, _ in out.records] == [("predictions", b"c-1")] * 5
    got = [orjson.loads(v) for _, v, _, _ in out.records]
    expected_scores = s.serving.score([r["features"] for r in [*plain, spaced, tricky]])
    for record, predicted, score in zip([*plain, spaced, tricky], got, expected_scores, strict=True):
        assert np.float32(predicted["score"]) == score and 0.0 <= score <= 1.0  # the float32, exactly
        assert predicted["model_version"] == "v7" and predicted["scored_at"].endswith("Z")
        assert predicted["role"] == "champion"  # no rollout runs
        for name in ("event_id", "card_id", "event_time", "features"):
            assert predicted[name] == record[name]
    fields = {"event_id", "card_id", "event_time", "features", "late", "score", "model_version", "role", "scored_at"}
    assert all(set(predicted) == fields for predicted in got)  # the same fields on every path
    assert s.rows == 5 and s.bad_records == 0


def test_unreadable_records_go_to_the_dlq_and_the_rest_is_scored():
    s, out = scorer(), Out()
    no_id = {k: v for k, v in features_record(1).items() if k != "event_id"}
    values = [b"not json", orjson.dumps(no_id), orjson.dumps({**features_record(2), "features": [1, 2]}),
              orjson.dumps(features_record(3))]
    s.process([HeldRecord(v, b"c-1", "features", 0, i) for i, v in enumerate(values)], out)
    dlq = [(v, dict(h)) for t, v, _, h in out.records if t == SPEC.topics.dlq]
    assert [v for v, _ in dlq] == values[:3]  # byte for byte
    assert all(h["eddy.stage"] == b"scorer" and b"unreadable features record" in h["eddy.error"] for _, h in dlq)
    assert [orjson.loads(v)["event_id"] for t, v, _, _ in out.records if t == "predictions"] == ["e-3"]
    assert s.bad_records == 3


def test_a_batch_spliced_at_once_equals_the_same_records_built_one_by_one():
    s = scorer()
    s.serving.manifest = SimpleNamespace(version="v%s-8")  # a % in the version is not a format
    plain = [orjson.dumps(features_record(i)) for i in range(1, 6)]
    together, apart = Out(), Out()
    s.process([HeldRecord(v, b"c-%d" % i, "features", 0, i) for i, v in enumerate(plain)], together)
    s.process([HeldRecord(v, b"c-%d" % i, "features", 0, i) for i, v in enumerate(plain)]
              + [HeldRecord(orjson.dumps(features_record(9, score=1)), b"c-9", "features", 0, 9)], apart)
    assert [k for _, _, k, _ in together.records] == [b"c-%d" % i for i in range(5)]
    scores = s.serving.score([orjson.loads(v)["features"] for v in plain])
    for (_, value, _, _), raw, score in zip(together.records, plain, scores, strict=True):
        scored_at = orjson.loads(value)["scored_at"]
        assert value == b'{"score":%s,"model_version":"v%%s-8","role":"champion","scored_at":"%s",%s' % (
            str(score).encode(), scored_at.encode(), raw[1:])  # numpy's float32 text is the shortest, as orjson's
    strip = [{k: v for k, v in orjson.loads(value).items() if k != "scored_at"} for _, value, _, _ in together.records]
    assert strip == [{k: v for k, v in orjson.loads(value).items() if k != "scored_at"}
                     for _, value, _, _ in apart.records[:5]]
    assert s.rows == 11 and s.bad_records == 0


# Features records as the engines write them (streams.featurize.feature_message): any ids, keys, times
# and feature values, including nulls, negative zero, huge and tiny floats and non-ASCII text.
_text = st.text(min_size=1, max_size=12)
_value = st.none() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False)
_records = st.fixed_dictionaries({
    "event_id": _text, "card_id": _text, "event_time": _text,
    "features": st.dictionaries(_text, _value, max_size=6), "late": st.booleans()})


@given(st.lists(st.tuples(_records, st.floats(0, 1, width=32)), min_size=1, max_size=8), _text)
def test_the_splice_gives_the_plain_builders_bytes_for_the_engines_records(batch, version):
    from features.validation import iso_ms

    values = [orjson.dumps(record) for record, _ in batch]
    records = [orjson.loads(v) for v in values]
    texts = orjson.dumps(np.asarray([score for _, score in batch], dtype=np.float32),
                         option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    scored_at = iso_ms(1_795_341_600_123)
    assert splice_applies(values, records)
    assert splice_predictions(values, texts, version, scored_at) == [
        prediction(record, text, version, scored_at) for record, text in zip(records, texts, strict=True)]


def test_the_splice_stands_aside_for_records_it_cannot_build_alike():
    record = features_record(1)
    assert not splice_applies([b" " + orjson.dumps(record)], [record])
    assert not splice_applies([orjson.dumps({**record, "score": 1})], [{**record, "score": 1}])
    built = orjson.loads(prediction({**record, "score": 1, "model_version": "x"}, b"0.5", "v1", "t"))
    assert (built["score"], built["model_version"]) == (0.5, "v1")
