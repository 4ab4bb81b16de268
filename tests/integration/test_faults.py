"""Faults injected into real services while a live stream flows through a whole stack (native engine,
online writer, scorer, supervisor) on the secure default: Redis paused beyond the clients' timeouts,
Redis at its memory bound, Redis killed, the only broker killed. Each time the stack recovers by itself
and the checker finds every event with exactly one features row and one prediction, equal to an
uninterrupted run's, and an empty DLQ."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import EDDY, REPO, run_eddy, stack_environment
from tests.faults import check_exactly_once, live_producer, source_records
from tests.stack_helpers import group_lag, status, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow, pytest.mark.chaos]
BACKLOG, RATE, LIVE = 5_000, 1_000, 8_000   # the live stream lasts 8 s; the fault falls inside it


@pytest.fixture
def stack(tmp_path):
    from deploy.settings import load_settings
    from features.spec import load_spec

    env = {**stack_environment(tmp_path / "home"), "EDDY_ENGINE": "native"}
    settings = load_settings(environ=env)
    try:
        up = run_eddy(["up"], env)
        assert up.returncode == 0, up.stderr
        settings = load_settings(environ=env)  # signed in: `eddy up` made the stack's credentials
        produced = run_eddy(["produce", "--count", str(BACKLOG), "--backfill", "1h", "--label-delay", "0",
                             "--seed", "3"], env)
        assert produced.returncode == 0, produced.stderr
        yield env, settings, load_spec(settings.pipeline)
    finally:
        run_eddy(["down"], env)


def during_a_live_stream(env, settings, spec, fault) -> float:
    """Start a live stream, inject `fault` once it flows, wait for it to end and every stage to catch
    up; returns the seconds from the fault's start to lag 0 on every group."""
    live = live_producer(EDDY, env, REPO, RATE, LIVE, seed=4)
    wait_for(lambda: source_records(settings.kafka, spec.topics.source) > BACKLOG + 500 or live.poll() is not None,
             60, "the live stream")
    assert live.poll() is None, "the live stream ended before the fault"
    started = time.monotonic()
    fault()
    _, errors = live.communicate(timeout=180)
    assert live.returncode == 0, errors
    for stage, topic in (("features", spec.topics.source), ("scorer", spec.topics.features),
                         ("online-writer", spec.topics.features)):
        group = spec.stage_id(stage)
        wait_for(lambda g=group, t=topic: group_lag(env, g, t) == 0, 300, f"{stage} to catch up")
    return time.monotonic() - started


def restarts(env) -> dict[str, int]:
    return {name: part["restarts"] for name, part in status(env)["parts"].items()}


def test_redis_paused_beyond_the_timeouts_is_waited_out(stack):
    env, settings, spec = stack
    before = restarts(env)
    redis_pid = status(env)["parts"]["redis"]["pid"]

    def pause_redis() -> None:
        os.kill(redis_pid, signal.SIGSTOP)
        time.sleep(12)  # past the clients' 5 s socket timeout, twice
        os.kill(redis_pid, signal.SIGCONT)

    during_a_live_stream(env, settings, spec, pause_redis)
    check_exactly_once(settings.kafka, spec, BACKLOG + LIVE)
    assert restarts(env) == before, "a stage died instead of waiting the pause out"
    log = (settings.logs_dir / "features-native.log").read_text()
    assert "waiting out a fault" in log and "resumed after" in log


def test_redis_at_its_memory_bound_is_waited_out(stack):
    import redis

    env, settings, spec = stack
    before = restarts(env)
    admin = redis.Redis.from_url(settings.redis_url)
    assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    bound = admin.config_get("maxmemory")["maxmemory"]
    seen: dict = {}

    def fill_redis() -> None:
        admin.config_set("maxmemory", admin.info("memory")["used_memory"])  # full now: every new key refused
        time.sleep(4)
        seen.update(status(env)["parts"])
        time.sleep(6)
        admin.config_set("maxmemory", bound)

    during_a_live_stream(env, settings, spec, fill_redis)
    check_exactly_once(settings.kafka, spec, BACKLOG + LIVE)
    assert restarts(env) == before, "a stage died instead of waiting for room"
    assert "memory bound" in seen["redis"]["note"], seen["redis"]
    assert seen["features-native"]["state"] == "up", seen["features-native"]
    log = (settings.logs_dir / "features-native.log").read_text()
    assert "waiting out a fault" in log and "maxmemory" in log and "resumed after" in log


@pytest.mark.parametrize("service", ["redis", "broker"])
def test_a_service_killed_mid_stream_comes_back_and_nothing_is_lost_or_doubled(stack, service):
    env, settings, spec = stack
    pid = status(env)["parts"][service]["pid"]
    during_a_live_stream(env, settings, spec, lambda: os.kill(pid, signal.SIGKILL))
    check_exactly_once(settings.kafka, spec, BACKLOG + LIVE)
    part = status(env)["parts"][service]
    assert part["state"] == "up" and part["restarts"] >= 1 and part["pid"] != pid
