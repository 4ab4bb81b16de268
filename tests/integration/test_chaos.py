"""`eddy chaos` on a private stack (native engine, secure default): a short soak whose random faults
(kills of the engine, the online writer, a scorer and Redis, and a Redis pause) each come back by
themselves and recover, and whose checker finds every event once with the right values; then the same
checker, given a doubled features row and a row of no event, finds each, and the prediction the scorer made of
the doubled row."""

from __future__ import annotations

import json

import orjson
import pytest

from tests.conftest import run_eddy, stack_environment
from tests.kafka_helpers import produce_all, read_committed
from tests.stack_helpers import group_lag, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow, pytest.mark.chaos]
MINUTES, RATE = 1.0, 300


def test_a_short_soak_comes_back_from_each_fault_and_the_checker_finds_nothing_wrong(tmp_path):
    from deploy.checker import check
    from deploy.settings import load_settings
    from features.spec import load_spec

    env = {**stack_environment(tmp_path / "home"), "EDDY_ENGINE": "native", "EDDY_STAGES": "split"}
    try:
        up = run_eddy(["up"], env)
        assert up.returncode == 0, up.stderr
        summary_file = tmp_path / "chaos.json"
        soak = run_eddy(["chaos", "--minutes", str(MINUTES), "--rate", str(RATE), "--every", "10", "--seed", "5",
                         "--faults", "engine,writer,scorer,redis,redis-pause", "--out", str(summary_file)],
                        env, timeout=1200)
        assert soak.returncode == 0, (soak.stdout, soak.stderr)
        summary = json.loads(summary_file.read_text())
        verdict = summary["verdict"]
        assert verdict["events"] == MINUTES * 60 * RATE
        assert (verdict["lost"], verdict["duplicated"], verdict["wrong"], verdict["unexpected"]) == (0, 0, 0, 0)
        assert (verdict["predictions_lost"], verdict["predictions_duplicated"]) == (0, 0)
        assert summary["faults"] >= 2 and len({i["fault"] for i in summary["injections"]}) >= 2, summary["injections"]
        for injection in summary["injections"]:
            assert injection["restart_s"] is not None and injection["recovery_s"] is not None, injection
        assert f"{summary['faults']} faults" in soak.stdout and "nothing lost, doubled or wrong" in soak.stdout

        settings = load_settings(environ=env)
        spec = load_spec(settings.pipeline)
        row = read_committed(settings.kafka, spec.topics.features, 1)[0]
        stranger = {**orjson.loads(row.value()), "event_id": "never-produced"}
        produce_all(settings.kafka, spec.topics.features, [(row.key(), row.value()), (b"x", orjson.dumps(stranger))])
        wait_for(lambda: group_lag(env, spec.stage_id("scorer"), spec.topics.features) == 0, 60, "the scorer")
        found = check(settings.kafka, spec)  # the scorer scored the doubled row again: a doubled prediction
        assert not found.ok
        assert (found.lost, found.duplicated, found.unexpected, found.predictions_duplicated) == (0, 1, 1, 1)
        assert found.examples["unexpected"] == ["never-produced"]
    finally:
        run_eddy(["down"], env)
