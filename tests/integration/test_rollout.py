"""Rollouts in the stream, on a real stack with two scorer replicas (no judge: the steps are published by
hand here, as the judge would): in shadow every event gets exactly one served and one shadow prediction,
each tagged, and `predictions` holds no shadow record; as a canary each event is served once and scored
once in shadow by the other version, each entity keeps its version, the
served share follows the weight, a weight changed mid-stream across both replicas still gives exactly
one prediction per event, and a scorer killed mid-rollout comes back into the same rollout."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import defaultdict

import numpy as np
import orjson
import pytest

from tests.conftest import EDDY, REPO, run_eddy, stack_environment
from tests.faults import live_producer, source_records
from tests.kafka_helpers import count_committed, read_committed
from tests.stack_helpers import group_lag, status, variant, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from deploy.settings import load_settings
    from features.spec import load_spec

    env = {**stack_environment(tmp_path_factory.mktemp("rollout") / "home"), "EDDY_ENGINE": "native", "EDDY_STAGES": "split",
           "EDDY_SCORERS": "2"}
    settings = load_settings(environ=env)
    spec = load_spec(settings.pipeline)
    try:
        up = run_eddy(["up"], env)
        assert up.returncode == 0, up.stderr
        settings = load_settings(environ=env)  # signed in: `eddy up` made the stack's credentials
        variant(spec, settings, "v-challenger", 0.5)
        yield env, settings, spec
    finally:
        run_eddy(["down"], env)


def rollout(env: dict) -> dict:
    answer = run_eddy(["rollout", "status", "--json"], env)
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)


def scorers_at(settings, spec, rollout_id: str | None, percent: int | None = None) -> bool:
    """Both replicas apply this rollout step (None: no rollout), as each replica's own heartbeat says."""
    from streams.metrics import read_metrics
    from streams.stores import redis_client

    beats = read_metrics(redis_client(settings.redis_url), spec.name, "scorer", max_age_s=3)
    if len({b["pid"] for b in beats}) != 2:
        return False
    if rollout_id is None:
        return all(b.get("rollout") is None for b in beats)
    return all((b.get("rollout") or {}).get("id") == rollout_id
               and (percent is None or round(b["rollout"]["weight"] * 100) == percent) for b in beats)


def predictions(settings, topic: str, count: int) -> list[dict]:
    msgs = read_committed(settings.kafka, topic, count, timeout_s=120, idle_s=2.0)
    return [{**orjson.loads(m.value()), "_partition": m.partition(), "_offset": m.offset()} for m in msgs]


def test_shadow_scores_every_event_beside_the_champion_and_serves_only_the_champion(stack):
    env, settings, spec = stack
    started = run_eddy(["rollout", "start", "v-challenger", "--shadow", "--steps", "100"], env)
    assert started.returncode == 0, started.stderr
    state = rollout(env)
    assert (state["mode"], state["champion"], state["challenger"]) == ("shadow", "baseline-1", "v-challenger")
    assert state["weights"] == {"baseline-1": 1.0, "v-challenger": 0.0}
    wait_for(lambda: scorers_at(settings, spec, state["rollout"]["id"], 0), 60, "both scorers in shadow")
    served_before = count_committed(settings.kafka, spec.topics.predictions)
    earlier = {p["event_id"] for p in predictions(settings, spec.topics.predictions, served_before)}
    produced = run_eddy(["produce", "--count", "4000", "--cards", "800", "--label-delay", "0", "--compressed"], env)
    assert produced.returncode == 0, produced.stderr
    served = predictions(settings, spec.topics.predictions, served_before + 4000)
    shadow = predictions(settings, spec.topics.shadow, 4000)
    new = [p for p in served if p["event_id"] not in earlier]
    assert len(served) == served_before + 4000 and len(shadow) == 4000
    assert sorted(p["event_id"] for p in new) == sorted(p["event_id"] for p in shadow)
    assert len({p["event_id"] for p in shadow}) == 4000
    assert {(p["model_version"], p["role"]) for p in new} == {("baseline-1", "champion")}
    assert {(p["model_version"], p["role"]) for p in shadow} == {("v-challenger", "shadow")}
    assert all(p.get("role") != "shadow" for p in served)
    by_id = {p["event_id"]: p for p in new}
    assert any(abs(p["score"] - by_id[p["event_id"]]["score"]) > 1e-6 for p in shadow)  # another model scored it
    aborted = run_eddy(["rollout", "abort"], env)
    assert aborted.returncode == 0, aborted.stderr
    wait_for(lambda: scorers_at(settings, spec, None), 60, "both scorers out of the rollout")
    assert rollout(env)["mode"] == "none"
    assert [d["decision"] for d in rollout(env)["decisions"]][-2:] == ["start", "abort"]


def test_canary_by_entity_through_a_weight_change_and_a_kill_gives_one_prediction_per_event(stack):
    from models.rollout import canary_mask, current_rollout, publish_step
    from models.updates import read_updates

    env, settings, spec = stack
    key = settings.signing_key()
    started = run_eddy(["rollout", "start", "v-challenger", "--steps", "30,60,100"], env)
    assert started.returncode == 0, started.stderr
    rollout_id = rollout(env)["rollout"]["id"]
    wait_for(lambda: scorers_at(settings, spec, rollout_id, 30), 60, "both scorers at 30%")
    shadow_before = count_committed(settings.kafka, spec.topics.shadow)
    served_before = count_committed(settings.kafka, spec.topics.predictions)
    earlier = {p["event_id"] for p in predictions(settings, spec.topics.predictions, served_before)}
    sources = source_records(settings.kafka, spec.topics.source)
    victim = status(env)["parts"]["scorer-0"]
    live = live_producer(EDDY, env, REPO, rate=1500, count=15_000, seed=9)
    wait_for(lambda: source_records(settings.kafka, spec.topics.source) > sources + 4_000 or live.poll() is not None,
             60, "the live stream under way")
    route, message = current_rollout(read_updates(settings.kafka, spec, key))
    publish_step(settings.kafka, spec, key, message, route.next_step(time.time()))  # 30% -> 60%, mid-stream
    wait_for(lambda: source_records(settings.kafka, spec.topics.source) > sources + 8_000 or live.poll() is not None,
             60, "more of the stream")
    os.kill(victim["pid"], signal.SIGKILL)  # mid-rollout, mid-stream
    assert live.poll() is None, "the live stream ended before the kill"
    _, errors = live.communicate(timeout=120)
    assert live.returncode == 0, errors
    wait_for(lambda: status(env)["parts"]["scorer-0"]["restarts"] > victim["restarts"], 60, "the restart")
    wait_for(lambda: scorers_at(settings, spec, rollout_id, 60), 60, "the restarted scorer back in the rollout at 60%")
    wait_for(lambda: group_lag(env, spec.stage_id("scorer"), spec.topics.features) == 0, 300, "the scorers to catch up")

    rows = [r for r in predictions(settings, spec.topics.predictions, served_before + 15_000)
            if r["event_id"] not in earlier]
    ids = [r["event_id"] for r in rows]
    assert len(ids) == 15_000 and len(set(ids)) == 15_000          # exactly one served prediction per event
    served_by = {r["event_id"]: r["model_version"] for r in rows}
    shadows = [r for r in predictions(settings, spec.topics.shadow, shadow_before + 15_000) if r["event_id"] in served_by]
    assert sorted(r["event_id"] for r in shadows) == sorted(ids)  # and exactly one shadow prediction, by the other
    assert all(r["role"] == "shadow" and r["model_version"] != served_by[r["event_id"]] for r in shadows)
    versions: dict[str, list[str]] = defaultdict(list)
    trail: dict[str, list[tuple]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["_partition"], r["_offset"])):
        assert (r["model_version"], r["role"]) in {("baseline-1", "champion"), ("v-challenger", "canary")}
        versions[r["card_id"]].append(r["model_version"])
        trail[r["card_id"]].append((r["_partition"], r["_offset"], r["scored_at"], r["model_version"]))
    cards = sorted(versions)
    at30 = canary_mask([c.encode() for c in cards], 0.3)
    at60 = canary_mask([c.encode() for c in cards], 0.6)
    for card, low, high in zip(cards, at30, at60, strict=True):
        seen = versions[card]
        if low:        # in the canary from the first step: always the challenger
            assert set(seen) == {"v-challenger"}, (card, trail[card], victim["pid"])
        elif not high:  # never in the canary: always the champion
            assert set(seen) == {"baseline-1"}, card
        else:          # joined at 60%: the champion, then the challenger, switching once
            switches = sum(a != b for a, b in zip(seen, seen[1:], strict=False))
            assert seen[0] == "baseline-1" or switches == 0, card
            assert switches <= 1 and (switches == 0 or seen[-1] == "v-challenger"), (card, seen)
    share = float(np.mean(at30))
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(cards)), (share, len(cards))
    assert run_eddy(["rollout", "abort"], env).returncode == 0
    wait_for(lambda: scorers_at(settings, spec, None), 60, "both scorers out of the rollout")
