"""The scorer's Redis state for sequence models on a real redis-server: a replayed batch scores the same
and is not applied twice; late rows are scored but do not enter the history."""

from __future__ import annotations

import uuid

import orjson
import pytest
import redis
import yaml

from features.spec import parse_spec

pytestmark = pytest.mark.redis


class Msg:
    def __init__(self, value: bytes, key: bytes, partition: int, offset: int) -> None:
        self._v, self._k, self._p, self._o = value, key, partition, offset

    def value(self):
        return self._v

    def key(self):
        return self._k

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def topic(self):
        return "features"

    def headers(self):
        return []


class Out:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def produce(self, topic, value, key=None, headers=None):
        self.records.append((topic, orjson.loads(value) if not headers else {"raw": value, **dict(headers)}))


def sequence_scorer(settings, tmp_path):
    from models.artifacts import load_artifact
    from models.baseline import baseline_artifact
    from models.scorer import Scorer, ScorerConfig

    data = yaml.safe_load(settings.pipeline.read_text())
    data["name"] = f"seq{uuid.uuid4().hex[:6]}"
    data["model"]["kind"] = "sequence"
    spec = parse_spec(data)
    key = settings.signing_key()
    baseline_artifact(spec, tmp_path / "m", key)
    scorer = Scorer(ScorerConfig(settings.kafka, spec, settings.redis_url, "cpu", key.public(), history=4),
                    redis.Redis.from_url(settings.redis_url))
    scorer.serving = load_artifact(tmp_path / "m", key, spec.spec_hash, list(spec.model_inputs), "cpu")
    return spec, scorer


def row(spec, n: int, count: int, late: bool = False) -> bytes:
    features = {name: float(count) for name in spec.model_inputs}
    features["secs_since_last"] = 5.0
    return orjson.dumps({"event_id": f"e{n}", spec.key: "c-1", "event_time": "2026-11-20T00:00:00.000Z",
                         "features": features, "late": late})


def test_replayed_batch_scores_identically_and_history_is_not_doubled(redis_settings, tmp_path):
    spec, scorer = sequence_scorer(redis_settings, tmp_path)
    batch = [Msg(row(spec, i, i + 1), b"c-1", 0, i) for i in range(3)]
    first, again = Out(), Out()
    scorer.process(batch, first)
    stored = scorer.history.get_many(["c-1"])["c-1"]
    assert [(p, o) for p, o, _ in stored] == [(0, 0), (0, 1), (0, 2)]

    scorer.process(batch, again)  # as after a crash: the same records again
    assert [r["score"] for _, r in again.records] == [r["score"] for _, r in first.records]
    assert scorer.history.get_many(["c-1"])["c-1"] == stored

    later = Out()
    scorer.process([Msg(row(spec, 3, 50, late=True), b"c-1", 0, 3), Msg(row(spec, 4, 4), b"c-1", 0, 4),
                    Msg(row(spec, 5, 5), b"c-1", 0, 5)], later)
    history = scorer.history.get_many(["c-1"])["c-1"]
    assert [(p, o) for p, o, _ in history] == [(0, 1), (0, 2), (0, 4), (0, 5)]  # the late row stays out; keep 4
    assert len(later.records) == 3 and all(topic == spec.topics.predictions for topic, _ in later.records)
    assert all(0.0 <= r["score"] <= 1.0 and r["model_version"] == "baseline-1" for _, r in later.records)


def test_unreadable_features_record_goes_to_the_dlq_and_the_rest_is_scored(redis_settings, tmp_path):
    spec, scorer = sequence_scorer(redis_settings, tmp_path)
    out = Out()
    bad = Msg(b"{not json", b"c-1", 1, 7)
    scorer.process([bad, Msg(row(spec, 9, 1), b"c-1", 1, 8)], out)
    assert scorer.bad_records == 1
    assert [t for t, _ in out.records] == [spec.topics.dlq, spec.topics.predictions]
    letter = out.records[0][1]
    assert letter["raw"] == b"{not json" and letter["eddy.stage"] == b"scorer"
    assert b"unreadable features record" in letter["eddy.error"] and letter["eddy.source.offset"] == b"7"
