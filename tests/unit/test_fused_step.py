"""The fused stage's step, with no broker: on the same source batch it produces the very features records
and dead letters the engine alone produces, and the very predictions the scorer makes of those records
(scoring time aside); the online store is handed each entity's newest timely row of the batch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import orjson
import torch

from features.spec import load_spec
from models.baseline import baseline_model
from models.fused import FusedStep
from models.scorer import Scorer, ScorerConfig
from models.scoring import LoadedModel
from models.signing import SigningKey
from streams.engines.config import EngineConfig
from streams.engines.native_engine import NativeStep
from streams.kafka import KafkaConfig
from streams.loop import HeldRecord

SPEC = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "fraud.yaml")
T0 = 1_795_341_600_000  # 2026-11-22T10:00:00Z


class Out:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    def produce(self, topic, value=None, key=None, *args, headers=None, **kwargs):
        self.records.append((topic, value, key))

    def on(self, topic: str) -> list[tuple]:
        return [r for r in self.records if r[0] == topic]


class Rows:
    """A rows writer that keeps what it is handed (the real one is streams.feast_redis.FeastRedisWriter)."""

    def __init__(self) -> None:
        self.written: dict[str, tuple[int, dict]] = {}

    def write(self, keys, event_ms, features) -> int:
        self.written.update(zip(keys, zip(event_ms, features, strict=True), strict=True))
        return len(keys)


def engine() -> NativeStep:
    config = EngineConfig(KafkaConfig("127.0.0.1:1"), SPEC, "redis://127.0.0.1:1/0", Path("/nonexistent"), 3)
    return NativeStep(config, None, "changelog")


def scorer() -> Scorer:
    torch.manual_seed(0)
    s = Scorer(ScorerConfig(KafkaConfig("127.0.0.1:1"), SPEC, "redis://127.0.0.1:1/0", "cpu",
                            SigningKey.generate().public()), redis_client=None)
    model, normaliser = baseline_model(SPEC)
    s.serving = LoadedModel(model, normaliser, SimpleNamespace(version="v1"), device="cpu")
    return s


def source_batch() -> list[HeldRecord]:
    """Five cards' events a few seconds apart, one of them sent twice (with no Redis here, no deduper drops
    it: both stages score it twice alike), one late beyond the lateness, one not JSON."""
    records = []
    for i in range(40):
        t = T0 + 3_000 * i if i != 31 else T0  # event 31 comes late
        event = {"event_id": f"e-{i}", "event_time": t, "card_id": f"c-{i % 5}", "merchant_id": f"m-{i % 7}",
                 "amount": 10.0 + i, "currency": "EUR", "country": "DE", "channel": "online"}
        records.append((orjson.dumps(event), f"c-{i % 5}".encode(), T0 + 3_000 * i))
    records.insert(20, records[7])  # sent twice
    records.insert(25, (b"not json", b"c-0", T0 + 60_000))
    return [HeldRecord(value, key, SPEC.topics.source, 0, offset, ts) for offset, (value, key, ts) in enumerate(records)]


def without_time(value: bytes) -> dict:
    return {k: v for k, v in orjson.loads(value).items() if k != "scored_at"}


def test_the_fused_step_gives_the_split_stages_rows_and_predictions():
    batch = source_batch()

    # split: the engine, then the scorer on the features records as it would read them
    split_engine, split_scorer, split_out = engine(), scorer(), Out()
    split_engine.process(batch, split_out)
    features = split_out.on(SPEC.topics.features)
    scored = Out()
    split_scorer.process([HeldRecord(v, k, SPEC.topics.features, 0, i) for i, (_, v, k) in enumerate(features)], scored)

    fused_scorer, rows, out = scorer(), Rows(), Out()
    step = FusedStep(engine(), fused_scorer, rows)
    step.process(batch, out)

    assert len(features) == 41  # 42 records, one unreadable
    assert out.on(SPEC.topics.features) == features
    assert out.on(SPEC.topics.dlq) == split_out.on(SPEC.topics.dlq) and len(out.on(SPEC.topics.dlq)) == 1
    predictions = out.on(SPEC.topics.predictions)
    assert [(k, without_time(v)) for _, v, k in predictions] == [(k, without_time(v)) for _, v, k in scored.records]
    assert {orjson.loads(v)["event_id"] for _, v, _ in predictions} == {orjson.loads(v)["event_id"] for _, v, _ in features}

    # the online store gets each card's newest timely row of the batch; the late one is not written
    newest: dict[str, dict] = {}
    for _, value, _ in features:
        row = orjson.loads(value)
        if not row["late"]:
            newest[row["card_id"]] = row
    assert sum(orjson.loads(v)["late"] for _, v, _ in features) == 1
    assert {k: f for k, (_, f) in rows.written.items()} == {k: r["features"] for k, r in newest.items()}
    assert (step.writer.events, step.writer.late) == (41, 1)
    assert fused_scorer.rows == 41


def test_an_empty_or_refused_batch_scores_and_writes_nothing():
    rows, out = Rows(), Out()
    step = FusedStep(engine(), scorer(), rows)
    step.process([HeldRecord(b"not json", b"c-0", SPEC.topics.source, 0, 0, T0)], out)
    assert [r[0] for r in out.records if r[0] != "changelog"] == [SPEC.topics.dlq]  # and the offset marker
    assert rows.written == {} and step.scorer.rows == 0
