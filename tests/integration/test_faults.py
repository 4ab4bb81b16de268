"""Faults injected into real services while a live stream flows through a whole stack (native engine,
online writer, scorer, supervisor) on the secure default: Redis paused beyond the clients' timeouts,
Redis at its memory bound, Redis slow, Redis killed, the only broker killed. Each time the stack recovers by itself
and the checker finds every event with exactly one features row and one prediction, equal to an
uninterrupted run's, and an empty DLQ."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest

from tests.conftest import EDDY, REPO, run_eddy, stack_environment
from tests.faults import (
    BACKLOG,
    LIVE,
    RATE,
    caught_up,
    check_exactly_once,
    during_a_live_stream,
    live_producer,
    pickle_trap,
    source_records,
)
from tests.proxy import FaultProxy
from tests.stack_helpers import group_lag, status, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow, pytest.mark.chaos]
OPEN_LIVE = 600_000  # a stream with no end in sight, stopped by the test once its faults are in (see scaled_back)


@contextmanager
def running_stack(env: dict[str, str]):
    """`eddy up` with env, a backlog produced; yields (env, settings, spec) and stops the stack after."""
    from deploy.settings import load_settings
    from features.spec import load_spec

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


@pytest.fixture
def cluster(tmp_path):
    """The stack on three local brokers (`eddy up` with EDDY_BROKERS=3)."""
    with running_stack({**stack_environment(tmp_path / "home"), "EDDY_ENGINE": "native", "EDDY_STAGES": "split",
                        "EDDY_BROKERS": "3"}) as running:
        yield running


@pytest.fixture
def stack(tmp_path):
    with running_stack({**stack_environment(tmp_path / "home"), "EDDY_ENGINE": "native", "EDDY_STAGES": "split"}) as running:
        yield running


@contextmanager
def through_a_proxy(tmp_path, listen_variable: str, client_port):
    """A stack whose every client reaches one service through a FaultProxy at client_port(env): the local
    service binds another port (`listen_variable`); yields (env, settings, spec, proxy)."""
    from deploy.processes import free_port

    env = {**stack_environment(tmp_path / "home"), "EDDY_ENGINE": "native", "EDDY_STAGES": "split"}
    env[listen_variable] = f"127.0.0.1:{(listen := free_port())}"
    proxy = FaultProxy(client_port(env), listen)
    try:
        with running_stack(env) as running:
            yield (*running, proxy)
    finally:
        proxy.close()


@pytest.fixture
def behind_a_proxy(tmp_path):
    """Every client reaches the broker through a FaultProxy: the broker binds another port
    (EDDY_KAFKA_LISTEN) and advertises the proxy's."""
    with through_a_proxy(tmp_path, "EDDY_KAFKA_LISTEN", lambda env: int(env["EDDY_KAFKA_BOOTSTRAP"].rpartition(":")[2])) as stack:
        yield stack


@pytest.fixture
def redis_behind_a_proxy(tmp_path):
    """Every client reaches Redis through a FaultProxy: redis-server listens on another port
    (EDDY_REDIS_LISTEN) and clients use EDDY_REDIS_URL's, the proxy's."""
    from urllib.parse import urlsplit

    with through_a_proxy(tmp_path, "EDDY_REDIS_LISTEN", lambda env: urlsplit(env["EDDY_REDIS_URL"]).port) as stack:
        yield stack


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


def test_poison_on_the_engines_changelog_is_refused_at_restore_and_the_state_rebuilt(stack, tmp_path):
    """Pickled bytes and NaN as a real card's state, a value too short and a partition marker that is not
    JSON, on every partition of the native engine's changelog, then the engine killed: its restore refuses
    each record with its reason (nothing unpickled), rebuilds the partitions from their first source record
    and writes them whole again, so a second kill restores cleanly; no crash loop, and every event is
    exactly once with the values of an uninterrupted run."""
    import orjson
    from confluent_kafka import Producer

    from streams.engines.native_state import entity_value
    from tests.kafka_helpers import read_committed

    env, settings, spec = stack
    changelog = f"{spec.stage_id('features')}-native-state-changelog"
    marker = tmp_path / "unpickled"
    part = "features-native"
    warning = "changelog records are not the engine's"

    caught_up(env, spec, 180)
    card = str(orjson.loads(read_committed(settings.kafka, spec.topics.source, 1)[0].value())[spec.key]).encode()
    poison = [(card, entity_value(1, pickle_trap(marker))), (card, entity_value(1, b'["x", NaN]')),
              (b"poison-card", b"short"), (b"", b"not json")]
    producer = Producer(settings.kafka.client())
    for partition in range(settings.partitions):
        for key, value in poison:
            producer.produce(changelog, value, key, partition=partition)
    assert producer.flush(30) == 0

    def kill_then_stream(kills: int, seed: int) -> None:
        os.kill(status(env)["parts"][part]["pid"], signal.SIGKILL)
        wait_for(lambda: (p := status(env)["parts"][part])["restarts"] == kills and p["state"] == "up", 90,
                 "the engine back")
        more = run_eddy(["produce", "--count", "1000", "--seed", str(seed), "--label-delay", "0", "--compressed"], env)
        assert more.returncode == 0, more.stderr
        caught_up(env, spec, 180)

    kill_then_stream(1, 21)
    log = (settings.logs_dir / f"{part}.log").read_text()
    assert log.count(warning) == settings.partitions, log[-3000:]
    assert "offset" in log and "not JSON" in log
    kill_then_stream(2, 22)  # the first restore wrote the partitions whole: nothing to refuse now
    assert (settings.logs_dir / f"{part}.log").read_text().count(warning) == settings.partitions
    check_exactly_once(settings.kafka, spec, BACKLOG + 2000)
    assert not marker.exists(), "something unpickled a changelog record"
    assert status(env)["parts"][part]["restarts"] == 2, "the engine crash-looped"


def scaled_up(env, settings, spec, args: list[str], seed: int):
    """A live stream that runs until scaled_back stops it, and `eddy up ARGS` once it flows: (the parts
    before, the stream, the parts after). The stream has no set length, so the scaling and its undoing fall
    inside it however long they take on a slow machine."""
    before = status(env)["parts"]
    live = live_producer(EDDY, env, REPO, RATE, OPEN_LIVE, seed=seed)
    wait_for(lambda: source_records(settings.kafka, spec.topics.source) > BACKLOG + 500 or live.poll() is not None,
             60, "the live stream")
    scaled = run_eddy(["up", *args], env)
    assert scaled.returncode == 0, scaled.stderr
    return before, live, status(env)["parts"]


def scaled_back(env, settings, spec, live, args: list[str], before: dict) -> dict:
    """`eddy up ARGS` while the live stream still flows, 5 s more of it, then its end (Ctrl-C: whatever the
    producer had sent is in the source, the rest never was): every group caught up, every event in the source
    exactly once, and the first parts (the supervisor, the first engine, the writer, the first scorer) still
    the processes they were before the scaling; returns the parts after."""
    scaled = run_eddy(["up", *args], env)
    assert scaled.returncode == 0, scaled.stderr
    assert live.poll() is None, f"the live stream ended before `eddy up {' '.join(args)}`"
    time.sleep(5)
    live.send_signal(signal.SIGINT)
    _, errors = live.communicate(timeout=60)
    assert live.returncode == 130, errors
    events = source_records(settings.kafka, spec.topics.source)
    assert events > BACKLOG + 10 * RATE, f"only {events - BACKLOG} live events"
    caught_up(env, spec, 300)
    check_exactly_once(settings.kafka, spec, events)
    after = status(env)["parts"]
    for name in ("supervisor", "features-native", "online-writer", "scorer-0"):
        assert after[name]["pid"] == before[name]["pid"] and after[name].get("restarts", 0) == 0, (name, after[name])
    return after


def test_the_scorers_scaled_1_3_1_under_load_lose_and_double_nothing(stack):
    """`eddy up --scorers 3`, a rolling restart of the new replicas (SIGKILL, SIGTERM), then `--scorers 1`, on
    the running stack during a live stream: the new replicas join the scorers' group and take partitions,
    come back by themselves, the retired ones leave it, nothing else restarts (the
    supervisor scales, it is not replaced), no replica crash-loops on fencing, and every event has exactly
    one features row and one prediction."""
    env, settings, spec = stack
    before, live, scaled = scaled_up(env, settings, spec, ["--scorers", "3"], seed=5)
    assert all(scaled[f"scorer-{i}"]["state"] == "up" for i in range(3)), scaled
    # a rolling restart of the new replicas under load: one killed, one stopped, each back by itself
    assert live.poll() is None, "the live stream ended before the rolling restart"
    for replica, sig in (("scorer-1", signal.SIGKILL), ("scorer-2", signal.SIGTERM)):
        os.kill(scaled[replica]["pid"], sig)
        wait_for(lambda r=replica: (p := status(env)["parts"][r])["restarts"] == 1 and p["state"] == "up"
                 and p["pid"] != scaled[r]["pid"], 90, f"{replica} back")
    assert not any(p.get("crash_looping") for p in status(env)["parts"].values())
    after = scaled_back(env, settings, spec, live, ["--scorers", "1"], before)
    assert "scorer-1" not in after and "scorer-2" not in after, after.keys()
    for replica in ("scorer-1", "scorer-2"):  # each took partitions, then gave them back as it stopped
        log = (settings.logs_dir / f"{replica}.log").read_text()
        assert f"partitions assigned: {spec.topics.features}[" in log and "partitions revoked" in log, log[-2000:]
        assert "Fenced" not in log and "fenced" not in log


def test_the_engine_workers_scaled_1_3_2_under_load_lose_and_double_nothing(stack):
    """`eddy up --engine-workers 3`, then `--engine-workers 2`, on the running stack during a live stream: the
    new workers join the engine's group, each restores the entity states of the partitions it is given from
    the changelog, the retired one hands its partitions back; nothing else restarts, and every event has
    exactly one features row, equal to an uninterrupted run's, and one prediction."""
    env, settings, spec = stack
    before, live, scaled = scaled_up(env, settings, spec, ["--engine-workers", "3"], seed=6)
    assert all(scaled[name]["state"] == "up" for name in ("features-native", "features-native-1", "features-native-2"))
    time.sleep(10)  # the three share the stream a while
    after = scaled_back(env, settings, spec, live, ["--engine-workers", "2"], before)
    assert "features-native-2" not in after and after["features-native-1"]["state"] == "up", after.keys()
    for worker in ("features-native-1", "features-native-2"):  # each took partitions and restored their states
        log = (settings.logs_dir / f"{worker}.log").read_text()
        assert f"partitions assigned: {spec.topics.source}[" in log and "restored " in log, log[-2000:]
        assert "enced" not in log, log[-2000:]
    assert "partitions revoked" in (settings.logs_dir / "features-native-2.log").read_text()


def test_a_partition_from_the_broker_longer_than_the_request_timeouts_is_waited_out(behind_a_proxy):
    """Every client's link to the broker goes silent for 45 s (requests time out after 30 s), then heals."""
    env, settings, spec, proxy = behind_a_proxy
    assert proxy.connections > 0  # the stack does reach the broker through the proxy
    before = restarts(env)

    def partition() -> None:
        proxy.partition()
        time.sleep(45)
        proxy.heal()

    during_a_live_stream(env, settings, spec, partition)
    check_exactly_once(settings.kafka, spec, BACKLOG + LIVE)
    assert restarts(env) == before, "a part died instead of waiting the partition out"


def test_three_brokers_one_killed_then_one_paused_lose_and_double_nothing(cluster):
    """On three brokers (every topic, the internal ones too, on three replicas, min.insync.replicas 2): one
    broker SIGKILLed during a live stream, then another SIGSTOPped for 30 s during a second. Each time the
    partitions it led move to the others, the killed one comes back by itself, no other broker restarts and no
    stage restarts but by the watchdog's remedy for a hung librdkafka call, and every event has exactly one
    features row and one prediction."""
    from streams.kafka import admin

    env, settings, spec = cluster
    parts = status(env)["parts"]
    assert parts["broker"]["brokers"] == 3 and parts["broker-2"]["state"] == parts["broker-3"]["state"] == "up"
    topics = admin(settings.kafka).list_topics(timeout=10).topics
    for name in (*spec.topics.all(), "__consumer_offsets", "__transaction_state"):
        assert {len(p.replicas) for p in topics[name].partitions.values()} == {3}, name
    before = restarts(env)
    killed = parts["broker-2"]["pid"]
    took_kill = during_a_live_stream(env, settings, spec, lambda: os.kill(killed, signal.SIGKILL))
    check_exactly_once(settings.kafka, spec, BACKLOG + LIVE)
    back = status(env)["parts"]["broker-2"]
    assert back["state"] == "up" and back["pid"] != killed and back["restarts"] == before["broker-2"] + 1
    paused = status(env)["parts"]["broker-3"]["pid"]

    def pause() -> None:
        os.kill(paused, signal.SIGSTOP)
        time.sleep(30)
        os.kill(paused, signal.SIGCONT)

    took_pause = during_a_live_stream(env, settings, spec, pause, seed=5, before=BACKLOG + LIVE)
    check_exactly_once(settings.kafka, spec, BACKLOG + 2 * LIVE)
    # No other part died, but for one remedy: librdkafka was seen (1 run in 4) to leave a transaction call
    # unanswered for 90 s after a broker died, despite its 30 s timeout; the watchdog then ends the stage
    # (status 70) and supervision restarts it, as after a single broker's bounce.
    parts = status(env)["parts"]
    restarted = {k: v - before[k] for k, v in restarts(env).items() if k != "broker-2" and v != before[k]}
    assert all(parts[k]["last_exit_code"] == 70 and k not in ("broker", "broker-3", "redis") for k in restarted), \
        {k: (parts[k].get("last_reason"), n) for k, n in restarted.items()}
    print(f"three brokers: lag 0 on every group {took_kill:.0f} s after a broker was killed, "
          f"{took_pause:.0f} s after another was paused (30 s of it); restarted by the watchdog: {restarted or 'none'}")


# The broker case held only once the lone broker had a controller of its own: a combined broker and
# controller, killed, split a committing transaction in some runs (docs/reliability.md).
@pytest.mark.parametrize("service", ["redis", "broker", "controller"])
def test_a_service_killed_mid_stream_comes_back_and_nothing_is_lost_or_doubled(stack, service):
    env, settings, spec = stack
    pid = status(env)["parts"][service]["pid"]
    during_a_live_stream(env, settings, spec, lambda: os.kill(pid, signal.SIGKILL))
    check_exactly_once(settings.kafka, spec, BACKLOG + LIVE)
    part = status(env)["parts"][service]
    assert part["state"] == "up" and part["restarts"] >= 1 and part["pid"] != pid


def test_a_slow_redis_is_ridden_out_without_a_rebalance_and_the_lag_drains_after(redis_behind_a_proxy):
    """Every Redis round trip of every stage some 200x slower (25 ms each way, against ~0.1 ms) for 20 s of
    the live stream: the stages fall behind but keep their partitions (no group rebalance, no restart),
    and drain the lag once Redis is fast again; exactly once, rows equal an uninterrupted run's."""
    env, settings, spec, proxy = redis_behind_a_proxy
    before = restarts(env)
    lags: list[int] = []

    def slow_redis() -> None:
        proxy.slow(0.025)
        until = time.monotonic() + 20
        while time.monotonic() < until:
            lags.append(group_lag(env, spec.stage_id("features"), spec.topics.source) or 0)
            time.sleep(2)
        proxy.slow(0)

    took = during_a_live_stream(env, settings, spec, slow_redis)
    check_exactly_once(settings.kafka, spec, BACKLOG + LIVE)
    assert restarts(env) == before, "a stage died instead of riding the slow Redis out"
    for part in ("features-native", "scorer-0", "online-writer"):
        log = (settings.logs_dir / f"{part}.log").read_text()
        assert log.count("partitions assigned") == 1 and "partitions revoked" not in log, (part, "rebalanced")
    print(f"slow Redis: the engine's lag peaked at {max(lags)} records; every group at lag 0 {took:.0f} s "
          "after the slowness began (20 s of it)")


# ~400 us of model per event here, against ~12 us for the whole default scorer: slow enough that the burst
# (produced at ~6,000 events/s) leaves the scorer batches behind on a quiet machine too (at 2,048 wide, a
# quiet run's scorer kept up within 1,656 records)
SLOW_HIDDEN = [4096, 4096]


def test_a_slow_model_is_ridden_out_without_a_rebalance_and_the_lag_drains_after(stack):
    """A model about 10x slower than the whole scorer's usual work per event (the baseline's scores, exactly,
    through wide hidden layers) is swapped in; then a burst of 20,000 events lands on top of the live stream.
    The scorer falls thousands of records behind, scoring full batches, but keeps its partitions (no group
    rebalance, no transaction timeout, no restart) and drains; exactly once."""
    import torch

    from models.artifacts import save_artifact
    from models.baseline import baseline_model
    from models.updates import publish

    env, settings, spec = stack
    model, normaliser = baseline_model(spec, {"hidden": SLOW_HIDDEN})
    fast, _ = baseline_model(spec)
    rows = torch.randn(4096, normaliser.n_inputs)
    with torch.no_grad():
        assert torch.equal(model(rows), fast(rows))  # slow, not different: every score is the baseline's
    directory = settings.artifacts_dir / spec.name / "slow-1"
    manifest = save_artifact(directory, model, normaliser, {"version": "slow-1", "spec_hash": spec.spec_hash},
                             settings.signing_key())
    publish(settings.kafka, spec.topics.model_updates, manifest, directory.as_uri(), settings.signing_key())
    wait_for(lambda: status(env)["parts"]["scorer-0"].get("model_version") == "slow-1", 60, "the slow model")
    before = restarts(env)
    lags: list[int] = []

    def burst() -> None:
        more = subprocess.Popen([*EDDY, "produce", "--count", "20000", "--seed", "8", "--label-delay", "0",
                                 "--compressed"], env={**os.environ, **env}, cwd=REPO, stdout=subprocess.DEVNULL)
        while True:  # the scorer's lag, until the burst is sent and the scorer has caught up with it
            lags.append(group_lag(env, spec.stage_id("scorer"), spec.topics.features) or 0)
            if more.poll() is not None and lags[-1] == 0:
                break
            time.sleep(0.5)
        assert more.returncode == 0

    took = during_a_live_stream(env, settings, spec, burst)
    check_exactly_once(settings.kafka, spec, BACKLOG + LIVE + 20_000)
    assert restarts(env) == before, "a stage died instead of riding the slow model out"
    assert status(env)["parts"]["scorer-0"]["model_version"] == "slow-1"
    assert max(lags) > 4096, f"the scorer never fell a batch behind (peak lag {max(lags)}): the model was not slow"
    log = (settings.logs_dir / "scorer-0.log").read_text()
    assert log.count("partitions assigned") == 1 and "partitions revoked" not in log, "the scorer rebalanced"
    print(f"slow model: the scorer's lag peaked at {max(lags)} records; every group at lag 0 {took:.0f} s "
          "after the burst began")


def test_poison_on_every_topic_a_stage_reads_is_refused_and_changes_nothing_else(stack, tmp_path):
    """Pickled bytes, NaN, Inf, an event hours ahead and records over the bounds, on the source, features,
    labels and model-updates topics: each refused with a dead letter (source, features) or counted
    (model updates), no stage dies, nothing is unpickled, and every valid event is still exactly once."""
    from datetime import UTC, datetime, timedelta

    import orjson
    from confluent_kafka import KafkaError, Producer

    from deploy.checker import check
    from models.retrain import training_set
    from tests.kafka_helpers import produce_all, read_committed

    env, settings, spec = stack
    before = restarts(env)
    marker = tmp_path / "unpickled"

    event = orjson.loads(read_committed(settings.kafka, spec.topics.source, 1)[0].value())
    ahead = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    common = [pickle_trap(marker), b'{"event_id": "poison-nan", "amount": NaN}', b'{"event_id": "poison-inf", "amount": 1e999}']
    source = [*common, orjson.dumps({**event, spec.id_field: "poison-ahead", spec.timestamp_field: ahead}),
              orjson.dumps({**event, spec.id_field: "poison-big", "padding": "x" * 100_000})]
    features = [*common, orjson.dumps({"event_id": "poison-big", "padding": "x" * 100_000})]
    topics = ((spec.topics.source, source), (spec.topics.features, features), (spec.labels.topic, common),
              (spec.topics.model_updates, common))
    refusals: list = []
    huge = Producer(settings.kafka.client(**{"message.max.bytes": 20_000_000}))
    for topic, records in topics:
        produce_all(settings.kafka, topic, [(str(event[spec.key]).encode(), value) for value in records])
        huge.produce(topic, b"x" * 10_000_000, on_delivery=lambda err, _msg, t=topic: refusals.append((t, err.code())))
    huge.flush(60)
    assert sorted(refusals) == sorted((t, KafkaError.MSG_SIZE_TOO_LARGE) for t, _ in topics)  # 10 MB: over the broker's bound
    more = run_eddy(["produce", "--count", "2000", "--seed", "9", "--label-delay", "0", "--compressed"], env)
    assert more.returncode == 0, more.stderr
    caught_up(env, spec, 180)

    verdict = check(settings.kafka, spec)
    assert (verdict.events, verdict.refused) == (BACKLOG + 2000, len(source)), verdict.summary()
    assert (verdict.lost, verdict.duplicated, verdict.wrong) == (0, 0, 0), (verdict.summary(), verdict.examples)
    assert (verdict.predictions_lost, verdict.predictions_duplicated) == (0, 0), verdict.summary()
    assert verdict.unexpected == len(features)  # the poison rows themselves, each refused by the scorer:
    assert verdict.dead_letters == len(source) + len(features), verdict.summary()
    assert restarts(env) == before, "a stage died of a poison record"
    assert not marker.exists(), "something unpickled a record"
    assert status(env)["parts"]["scorer-0"].get("model_version") == "baseline-1"
    history = training_set(settings.kafka, spec)  # `eddy retrain --source topics` skips the poison
    assert len(history.records) == BACKLOG + 2000 and history.unjoined_labels == 0
