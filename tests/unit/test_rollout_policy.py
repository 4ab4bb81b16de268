"""Rollouts (models.rollout) with no broker: the canary's entity hash, the policy and its refusals, the
judge's decisions on each bound, the signed step messages, and the scorer's routing of a batch in shadow
and canary (one served prediction per record, each tagged with its version and role)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
import torch

from features.errors import ConfigError
from features.spec import load_spec
from models.artifacts import save_artifact, verify_message
from models.baseline import baseline_model
from models.rollout import (
    Policy,
    Route,
    canary_mask,
    current_rollout,
    judge,
    load_policy,
    rollout_end_message,
    rollout_message,
    start_route,
)
from models.scorer import Scorer, ScorerConfig
from models.scoring import LoadedModel
from models.signing import SigningKey
from streams.kafka import KafkaConfig
from streams.loop import HeldRecord

SPEC = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "fraud.yaml")
KEYS = [f"c-{i}".encode() for i in range(20_000)]

KEY = SigningKey.from_hex("33" * 32)


def test_the_canary_takes_a_stable_growing_share_of_entities():
    for weight in (0.0, 0.1, 0.3, 1.0):
        share = canary_mask(KEYS, weight).mean()
        assert abs(share - weight) < 4 * np.sqrt(weight * (1 - weight) / len(KEYS)) + 1e-9
    assert (canary_mask(KEYS, 0.3) == canary_mask(list(reversed(KEYS)), 0.3)[::-1]).all()  # per key, not per position
    assert not (canary_mask(KEYS, 0.1) & ~canary_mask(KEYS, 0.3)).any()  # a canary entity stays one as weight grows


def test_policy_checks_name_the_fix(tmp_path):
    assert load_policy(None).steps == (10, 30, 100)
    assert load_policy(None, "30,100", shadow=True).steps == (0, 30, 100)
    for steps in ("30,10,100", "10,50", "10,x", "10,150"):
        with pytest.raises(ConfigError, match="rollout steps"):
            load_policy(None, steps)
    bad = tmp_path / "policy.yaml"
    bad.write_text("min_labeled: 10\n")
    with pytest.raises(ConfigError, match="unknown setting.*min_labeled.*known: .*min_labelled"):
        load_policy(bad)
    bad.write_text("max_pr_auc_drop: -1\n")
    with pytest.raises(ConfigError, match="max_pr_auc_drop: -1 is not a number >= 0"):
        load_policy(bad)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_policy(tmp_path / "missing.yaml")


def route(steps=(10, 30, 100), step=0, **policy) -> Route:
    r = start_route("v1", "v2", Policy(steps=steps, min_labelled=100, min_positives=5, min_step_s=60, **policy), now=0.0)
    for _ in range(step):
        r = r.next_step(0.0)
    return r


GOOD = {"labelled": 400, "positives": 20, "pr_auc": 0.70, "precision": 0.8, "rows": 1000, "refused": 0, "model_s": 1.0}


def test_the_judge_waits_for_evidence_then_advances_then_promotes():
    assert judge(route(), GOOD, {**GOOD, "labelled": 50}, now=100).action == "hold"
    held = judge(route(), GOOD, {**GOOD, "positives": 2}, now=100)
    assert held.action == "hold" and "2/5 positives" in held.reason
    assert judge(route(), GOOD, GOOD, now=30).action == "hold"          # the step's minimum duration
    advance = judge(route(), GOOD, GOOD, now=61)
    assert advance.action == "advance" and "next 30%" in advance.reason
    assert judge(route(step=2), GOOD, GOOD, now=61).action == "promote"


@pytest.mark.parametrize(("challenger", "words"), [
    ({"pr_auc": 0.60}, "PR-AUC 0.600 is 0.100 below"),
    ({"precision": 0.6}, "precision 0.600 is 0.200 below"),
    ({"refused": 20}, "20 of 1000 rows refused"),
    ({"model_s": 4.0}, "model time per row 4.0x"),
])
def test_a_broken_bound_rolls_back_at_any_step_once_there_is_evidence(challenger, words):
    decision = judge(route(), GOOD, {**GOOD, **challenger}, now=5)
    assert decision.action == "rollback" and words in decision.reason
    assert judge(route(), GOOD, {**GOOD, **challenger, "labelled": 99}, now=500).action == "hold"


def test_a_shifted_score_distribution_rolls_back():
    rng = np.random.default_rng(1)
    same = judge(route(), {**GOOD, "scores": rng.random(2000)}, {**GOOD, "scores": rng.random(2000)}, now=61)
    assert same.action == "advance" and same.metrics["score_psi"] < 0.05
    moved = judge(route(), {**GOOD, "scores": rng.random(2000)}, {**GOOD, "scores": rng.random(2000) ** 4}, now=61)
    assert moved.action == "rollback" and "score distribution shifted" in moved.reason


def test_steps_and_ends_are_signed_and_the_topic_says_which_rollout_runs(tmp_path):
    model, normaliser = baseline_model(SPEC)
    manifest = save_artifact(tmp_path, model, normaliser, {"version": "v2", "spec_hash": SPEC.spec_hash}, KEY)
    first = route()
    step = rollout_message(manifest, tmp_path.as_uri(), KEY, first)
    fields = {k: v for k, v in step.items() if k != "signature"}
    assert verify_message(fields, step["signature"], KEY)
    forged = {**fields, "rollout": {**fields["rollout"], "weight": 1.0, "step": 2}}
    assert not verify_message(forged, step["signature"], KEY)
    assert Route.from_message(step) == first
    second = rollout_message(manifest, tmp_path.as_uri(), KEY, first.next_step(10.0))
    assert current_rollout([step, second])[0].percent == 30
    end = rollout_end_message(manifest, tmp_path.as_uri(), KEY, first, "rolled_back", "PR-AUC fell")
    assert current_rollout([step, second, end]) is None
    assert end["rollout"]["outcome"] == "rolled_back"


class Out:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    def produce(self, topic, value=None, key=None, *args, headers=None, **kwargs):
        self.records.append((topic, value, key))


def loaded(version: str, scale: float) -> LoadedModel:
    torch.manual_seed(0)
    model, normaliser = baseline_model(SPEC)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return LoadedModel(model, normaliser, SimpleNamespace(version=version), device="cpu")


def batch(n: int) -> list[HeldRecord]:
    out = []
    for i in range(n):
        record = {"event_id": f"e-{i}", "card_id": f"c-{i % 97}", "event_time": "2026-11-22T10:00:00.123Z",
                  "features": {"txn_count_1m": i % 5, "amount_sum_1h": 10.0 * i, "amount_avg_24h": 5.0,
                               "merchants_24h": 1, "secs_since_last": 1.5}, "late": False}
        out.append(HeldRecord(orjson.dumps(record), f"c-{i % 97}".encode(), "features", 0, i))
    return out


def scorer_with(steps: tuple[int, ...]) -> Scorer:
    s = Scorer(ScorerConfig(KafkaConfig("127.0.0.1:1"), SPEC, "redis://127.0.0.1:1/0", "cpu", SigningKey.generate().public()), redis_client=None)
    s.serving, s.challenger = loaded("v1", 1.0), loaded("v2", 0.5)
    s.route = start_route("v1", "v2", Policy(steps=steps))
    return s


def routed(steps: tuple[int, ...], n: int) -> tuple[Scorer, list[HeldRecord], list[dict], list[dict]]:
    """A scorer at the first of `steps` after one batch of n records: it, the records, and what it
    wrote to the predictions and the shadow topics (nothing else)."""
    s, out, records = scorer_with(steps), Out(), batch(n)
    s.process(records, out)
    served = [orjson.loads(v) for t, v, _ in out.records if t == SPEC.topics.predictions]
    shadow = [orjson.loads(v) for t, v, _ in out.records if t == SPEC.topics.shadow]
    assert len(served) + len(shadow) == len(out.records)
    return s, records, served, shadow


def test_shadow_serves_the_champion_and_writes_one_shadow_prediction_per_record():
    s, records, served, shadow = routed((0, 100), 300)
    assert [p["event_id"] for p in served] == [p["event_id"] for p in shadow] == [f"e-{i}" for i in range(300)]
    assert {(p["model_version"], p["role"]) for p in served} == {("v1", "champion")}
    assert {(p["model_version"], p["role"]) for p in shadow} == {("v2", "shadow")}
    features = [orjson.loads(r.value())["features"] for r in records]
    assert np.allclose([p["score"] for p in shadow], s.challenger.score(features), atol=1e-7)
    assert s.by_version["v1"]["rows"] == s.by_version["v2"]["rows"] == 300


def test_canary_serves_each_record_once_by_its_entitys_version_and_the_other_scores_it_in_shadow():
    s, records, served, shadow = routed((30, 100), 500)
    assert sorted(p["event_id"] for p in served) == sorted(p["event_id"] for p in shadow) == sorted(
        f"e-{i}" for i in range(500))
    features = {orjson.loads(r.value())["event_id"]: orjson.loads(r.value())["features"] for r in records}
    expected = {v: dict(zip(features, m.score(list(features.values())), strict=True))
                for v, m in (("v1", s.serving), ("v2", s.challenger))}
    for p in served:
        to_canary = bool(canary_mask([p["card_id"].encode()], 0.3)[0])
        assert (p["model_version"], p["role"]) == (("v2", "canary") if to_canary else ("v1", "champion"))
    by_event = {p["event_id"]: p for p in served}
    canaried = 0
    for p in shadow:  # the version that did not serve the event scored it, in shadow
        other = "v1" if by_event[p["event_id"]]["model_version"] == "v2" else "v2"
        assert (p["model_version"], p["role"]) == (other, "shadow")
        assert abs(p["score"] - expected[other][p["event_id"]]) < 1e-6
        canaried += other == "v1"
    assert 0 < canaried < 500  # both versions serve some entities at 30%
    assert s.by_version["v1"]["rows"] == s.by_version["v2"]["rows"] == 500  # each scored every record
