"""The Faust and native engines as `eddy up` runs them: a kill -9 mid-stream loses and doubles nothing
(the native engine then restores from its checkpoint and replays the source since)."""

from __future__ import annotations

import json
import os
import signal
from collections import defaultdict

import orjson
import pytest

from tests.conftest import run_eddy, stack_environment
from tests.kafka_helpers import read_committed
from tests.stack_helpers import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

# Enough events that each engine is still at work when the test (polling `eddy status`) kills it.
EVENTS = {"faust": 30_000, "native": 200_000}


def expected_rows(kafka, spec, events: int) -> dict[str, dict]:
    """What an uninterrupted run computes: the shared Featurizer over each partition in offset order."""
    from streams.featurize import Featurizer
    from streams.validation import Validator

    source = read_committed(kafka, spec.topics.source, events)
    by_partition = defaultdict(list)
    for msg in source:
        by_partition[msg.partition()].append(msg)
    featurize, validator, states, rows = Featurizer(spec), Validator(spec), {}, {}
    for msgs in by_partition.values():
        for msg in sorted(msgs, key=lambda m: m.offset()):
            event = validator.parse(msg.value())
            new_state, value = featurize.apply(states.get(event.key), event)
            if new_state is not None:
                states[event.key] = new_state
            rows[event.event_id] = orjson.loads(value)
    return rows


@pytest.mark.parametrize("engine", ["faust", "native"])
def test_kill_9_of_the_engine_mid_stream_changes_no_row(tmp_path, engine):
    from deploy.settings import load_settings
    from features.spec import load_spec

    env = {**stack_environment(tmp_path / "home"), "EDDY_ENGINE": engine}
    events = EVENTS[engine]
    settings = load_settings(environ=env)
    spec = load_spec(settings.pipeline)
    try:
        assert run_eddy(["up"], env).returncode == 0
        produced = run_eddy(["produce", "--count", str(events), "--backfill", "2h", "--label-delay", "0",
                             "--seed", "11", "--start", "2026-11-20T00:00:00Z"], env)
        assert produced.returncode == 0, produced.stderr

        def features_lag():
            lag = json.loads(run_eddy(["status", "--json"], env).stdout).get("lag", {})
            return lag.get(f"eddy-{spec.name}-features", {}).get(spec.topics.source)

        # Kill it once it is well into the stream but not done.
        wait_for(lambda: (lag := features_lag()) is not None and lag < events * 0.8, 120, "processing to start")
        pid = json.loads(run_eddy(["status", "--json"], env).stdout)["parts"][f"features-{engine}"]["pid"]
        os.kill(pid, signal.SIGKILL)
        lag_at_kill = features_lag()
        assert lag_at_kill and lag_at_kill > 0, "the worker finished before it could be killed"

        restarted = run_eddy(["up"], env)
        assert restarted.returncode == 0, restarted.stderr
        assert any(line.startswith(f"up  features-{engine}") and "started in" in line
                   for line in restarted.stdout.splitlines()), restarted.stdout
        wait_for(lambda: features_lag() == 0, 300, "the restarted worker to catch up")

        rows = read_committed(settings.kafka, spec.topics.features, events, timeout_s=120, idle_s=3.0)
        got = [orjson.loads(m.value()) for m in rows]
        ids = [r["event_id"] for r in got]
        assert len(ids) == events and len(set(ids)) == events, "an event was lost or got two rows"
        want = expected_rows(settings.kafka, spec, events)
        assert {r["event_id"]: r for r in got} == want
        assert sum(r["late"] for r in got) == 0
        assert max(r["features"]["txn_count_1m"] for r in got) >= 3  # windows really accumulated
    finally:
        run_eddy(["down"], env)
