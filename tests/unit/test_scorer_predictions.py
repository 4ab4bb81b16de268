"""The scorer's predictions, with no broker: the bytes it writes parse to the contract's message (the
features record's own fields, its score, model version and scoring time), the same whichever way
they were built; a record it cannot read goes to the DLQ."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import torch

from features.spec import load_spec
from models.baseline import baseline_model
from models.scorer import Scorer, ScorerConfig
from models.scoring import LoadedModel
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
    s = Scorer(ScorerConfig(KafkaConfig("127.0.0.1:1"), SPEC, "redis://127.0.0.1:1/0", "cpu", b"k"), redis_client=None)
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
    for record, prediction, score in zip([*plain, spaced, tricky], got, expected_scores, strict=True):
        assert np.float32(prediction["score"]) == score and 0.0 <= score <= 1.0  # the float32, exactly
        assert prediction["model_version"] == "v7" and prediction["scored_at"].endswith("Z")
        for name in ("event_id", "card_id", "event_time", "features"):
            assert prediction[name] == record[name]
    assert set(got[0]) == {"event_id", "card_id", "event_time", "features", "late", "score", "model_version",
                           "scored_at"}
    assert set(got[4]) == {"event_id", "card_id", "event_time", "features", "score", "model_version", "scored_at"}
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
        assert value == b'{"score":%s,"model_version":"v%%s-8","scored_at":"%s",%s' % (
            str(score).encode(), scored_at.encode(), raw[1:])  # numpy's float32 text is the shortest, as orjson's
    strip = [{k: v for k, v in orjson.loads(value).items() if k != "scored_at"} for _, value, _, _ in together.records]
    assert strip == [{k: v for k, v in orjson.loads(value).items() if k != "scored_at"}
                     for _, value, _, _ in apart.records[:5]]
    assert s.rows == 11 and s.bad_records == 0
