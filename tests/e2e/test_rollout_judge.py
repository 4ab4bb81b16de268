"""The rollout judge on a real stack with lakehouse ingestion, against a champion trained on the stream: a
challenger trained on shuffled labels is rolled back by the policy on live labelled predictions, with no
event dropped; a challenger trained on the real labels goes 50% -> 100% and is promoted by itself. Every
decision is in gold.rollouts."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from tests.conftest import run_eddy, stack_environment
from tests.kafka_helpers import read_committed
from tests.stack_helpers import status, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.spark, pytest.mark.slow]
FUSED = "features-fused"
POLICY = """
steps: [50, 100]
min_labelled: 300
min_positives: 8
min_step_s: 5
max_pr_auc_drop: 0.15
max_precision_drop: 1.0
max_score_psi: 100
"""


def rollout(env: dict) -> dict:
    answer = run_eddy(["rollout", "status", "--json"], env)
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)


class Stream:
    """One generator for history and live stream alike (the cards keep their rhythm, so the features keep
    the distribution the models were trained on): the history as fast as possible, then a second of
    events at a time at 300 events/s, labels at once, until stopped."""

    GAP_MS = 3_600.0  # event time between two events of the whole stream

    def __init__(self, settings, spec, history: int) -> None:
        from streams.generator import GeneratorConfig, TransactionGenerator
        from streams.producer import SyntheticProducer

        span_ms = int(self.GAP_MS * (history + 300 * 900))  # the history, then up to 15 minutes live
        self.generator = TransactionGenerator(GeneratorConfig(
            seed=5, cards=300, fraud_rate=0.04, start_ms=int(time.time() * 1000) - span_ms, mean_gap_ms=self.GAP_MS,
            id_prefix="judge"))
        self.producer = SyntheticProducer(settings.kafka, spec.topics.source, spec.labels.topic, self.generator)
        self.producer.run(history, None, backfill=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.producer.run(300, 300.0, backfill=True)

    def end(self) -> int:
        self.stop.set()
        self.thread.join(120)
        assert not self.producer.errors
        return self.producer.report.events


def train(settings, spec, history: tuple, shuffled: bool, seed: int) -> str:
    """A model from the labelled history (the real retrain path), published nowhere."""
    from lakehouse.registry import register_model
    from models.retrain import TrainingSet, retrain

    records, labels, _ = history
    if shuffled:
        labels = np.random.default_rng(0).permutation(labels)
    time.sleep(1.1)  # versions are named by the second
    result = retrain(settings.kafka, spec, settings.artifacts, settings.signing_key(), "cpu",
                     "never", epochs=6, seed=seed, rows=lambda: TrainingSet(records, labels),
                     register=lambda entry: register_model(settings.lakehouse, entry))
    return result.version


def test_a_bad_challenger_is_rolled_back_and_a_good_one_promoted_by_the_policy(tmp_path):
    from deploy.settings import load_settings
    from features.spec import load_spec

    # the fused stage routes the canary and scores both versions in its own process
    env = {**stack_environment(tmp_path / "home"), "EDDY_STAGES": "fused", "EDDY_INGEST": "on",
           "EDDY_INGEST_TRIGGER": "1s",
           "EDDY_ROLLOUT_EVERY": "2s"}
    settings = load_settings(environ=env)
    spec = load_spec(settings.pipeline)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    try:
        up = run_eddy(["up"], env, timeout=300)
        assert up.returncode == 0, up.stderr
        settings = load_settings(environ=env)  # signed in: `eddy up` made the stack's credentials
        assert "rollouts" in status(env)["parts"]
        stream = Stream(settings, spec, history=12_000)
        wait_for(lambda: len(read_committed(settings.kafka, spec.topics.predictions, 12_000, timeout_s=5)) >= 12_000,
                 180, "the history scored")
        from models.retrain import training_set

        history = training_set(settings.kafka, spec)  # read once: the three models train on the same rows
        champion = train(settings, spec, history, shuffled=False, seed=0)
        assert run_eddy(["promote", champion], env).returncode == 0
        wait_for(lambda: status(env)["parts"][FUSED].get("model_version") == champion, 60, "the champion serving")
        bad = train(settings, spec, history, shuffled=True, seed=1)
        good = train(settings, spec, history, shuffled=False, seed=2)

        # The bad one: rolled back by itself once it has the evidence.
        assert run_eddy(["rollout", "start", bad, "--policy", str(policy)], env).returncode == 0
        stream.start()
        wait_for(lambda: rollout(env)["mode"] == "none", 300, "the judge to end the bad rollout")
        decisions = [d for d in rollout(env)["decisions"] if d["challenger"] == bad]
        assert [d["decision"] for d in decisions if d["decision"] != "hold"] == ["start", "rollback"], decisions
        rollback = decisions[-1]
        assert "PR-AUC" in rollback["reason"], rollback
        rolled_back_at = datetime.fromisoformat(str(rollback["decided_at"])).timestamp()
        wait_for(lambda: status(env)["parts"][FUSED].get("rollout") is None, 60, "the scoring out of the rollout")

        # The good one: 50%, then 100%, then promoted.
        assert run_eddy(["rollout", "start", good, "--policy", str(policy)], env).returncode == 0
        wait_for(lambda: rollout(env)["mode"] == "none", 420, "the judge to end the good rollout")
        produced = stream.end()
        decisions = [d for d in rollout(env)["decisions"] if d["challenger"] == good]
        assert [d["decision"] for d in decisions if d["decision"] != "hold"] == ["start", "advance", "promote"], decisions
        assert rollout(env)["champion"] == good
        wait_for(lambda: status(env)["parts"][FUSED].get("model_version") == good, 60, "the good one serving")

        # No event dropped or doubled: every produced event has exactly one served prediction.
        total = produced
        wait_for(lambda: len(read_committed(settings.kafka, spec.topics.predictions, total, timeout_s=5)) >= total,
                 180, "every prediction")
        served = read_committed(settings.kafka, spec.topics.predictions, total, timeout_s=60, idle_s=2.0)
        rows = [json.loads(m.value()) for m in served]
        assert len(rows) == total and len({r["event_id"] for r in rows}) == total
        canary_after = [r for r in rows if r["model_version"] == bad
                        and datetime.fromisoformat(r["scored_at"].replace("Z", "+00:00")).timestamp() > rolled_back_at]
        last_bad = max((datetime.fromisoformat(r["scored_at"].replace("Z", "+00:00")).timestamp()
                        for r in rows if r["model_version"] == bad), default=rolled_back_at)
        print(f"rollback decided at {datetime.fromtimestamp(rolled_back_at, UTC):%H:%M:%S}; the bad version's last "
              f"prediction {last_bad - rolled_back_at:+.2f} s after it ({len(canary_after)} predictions after)")
        for d in rollout(env)["decisions"]:
            print(f"{d['decided_at']} {d['challenger']} {d['percent']}% {d['decision']}: {d['reason']}")
            print(f"    {d['metrics']}")
    finally:
        run_eddy(["down"], env, timeout=120)
