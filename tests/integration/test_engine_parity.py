"""The Faust and native feature engines through the real broker and Redis: for both shipped specs, the
stream with every awkward case gives the naive reference's numbers, exactly once, as
`eddy run features-<engine>` runs it. (The Flink engine has its own test: tests/integration/test_flink_engine.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis

from streams.engines.config import STAGE
from streams.metrics import read_metrics
from tests.integration.test_flink_engine import PIPELINES, REPO
from tests.parity import as_role, check_engine_output, parity_case, same_features
from tests.stack_helpers import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.mark.parametrize("engine", ["faust", "native"])
@pytest.mark.parametrize("pipeline", ["fraud.yaml", "sensors.yaml"])
def test_engine_matches_the_naive_reference_exactly_once(settings, stack_env, tmp_path, pipeline, engine):
    case = parity_case(settings, PIPELINES / pipeline, tmp_path / pipeline)
    spec, spec_path, stream = case.spec, case.spec_path, case.stream

    env = {**os.environ, **stack_env, **as_role(stack_env, "features"), "EDDY_PIPELINE": str(spec_path),
           "EDDY_HOME": str(tmp_path / "home")}
    client = redis.Redis.from_url(settings.redis_url)
    run_until(env, f"features-{engine}", lambda: any(b["valid"] + b["dlq"] + b["duplicates"] == len(stream)
                                                     for b in read_metrics(client, spec.name, STAGE)),
              "the worker to see every record")
    beat = check_features(settings, case, client)
    assert beat["engine"] == engine
    assert Path(tmp_path / "home" / "logs" / f"features-{engine}.log").exists()


@pytest.mark.parametrize("pipeline", ["fraud.yaml", "sensors.yaml"])
def test_fused_stage_matches_the_reference_and_scores_each_row_once(settings, stack_env, tmp_path, pipeline):
    """The fused stage (`eddy run features-fused`, as its own least-privilege role): the same features and
    dead letters as the engine alone, one prediction per row by the serving model, and each entity's
    newest timely row in Feast's online store."""
    from deploy.settings import load_settings
    from features.feast_repo import online_features, open_feature_store
    from models.updates import ensure_baseline
    from tests.faults import check_scores

    case = parity_case(settings, PIPELINES / pipeline, tmp_path / pipeline)
    spec = case.spec
    home_env = {**stack_env, "EDDY_PIPELINE": str(case.spec_path), "EDDY_HOME": str(tmp_path / "home")}
    mine = load_settings(environ=home_env)
    version = ensure_baseline(settings.kafka, spec, mine.artifacts, mine.signing_key())
    assert version == "baseline-1"
    env = {**os.environ, **home_env, **as_role(stack_env, "fused"), "EDDY_ENGINE": "native"}
    client = redis.Redis.from_url(settings.redis_url)
    run_until(env, "features-fused", lambda: any(b["valid"] + b["dlq"] + b["duplicates"] == len(case.stream)
                                                 for b in read_metrics(client, spec.name, STAGE))
              and any(b["events"] == len(case.expected) for b in read_metrics(client, spec.name, "scorer")),
              "the fused stage to see and score every record")
    beat = check_features(settings, case, client)
    assert (beat["engine"], beat["stages"]) == ("native", "fused")
    rows = {m["event_id"]: m for m in _features_rows(settings, spec, len(case.expected))}
    assert check_scores(settings.kafka, spec, mine.artifacts_dir / spec.name / version, mine.trusted_keys(),
                        rows) == len(case.expected)

    # The online store holds each entity's newest timely row by event time (of rows with equal times,
    # one of them: which depends on how the batches fell).
    newest: dict[str, list[dict]] = {}
    for row in rows.values():
        if not row["late"]:
            held = newest.setdefault(row[spec.key], [])
            if held and row["event_time"] > held[0]["event_time"]:
                held.clear()
            if not held or row["event_time"] == held[0]["event_time"]:
                held.append(row)
    [writer] = read_metrics(client, spec.name, "online-writer", max_age_s=300)
    assert writer["events"] == len(case.expected) and writer["bad"] == 0
    keys = sorted(newest)
    online = online_features(open_feature_store(tmp_path / "home" / "feast"), spec, keys)
    for key, stored in zip(keys, online, strict=True):
        assert stored is not None and any(same_features(stored, r["features"]) for r in newest[key]), key


def test_faust_refuses_poison_on_its_changelog_at_restore_and_each_key_keeps_its_state(settings, stack_env,
                                                                                        tmp_path):
    """Between two runs of the Faust worker, pickled bytes and NaN written as a real card's state on every
    partition of its table's changelog, and values that are not JSON under other keys. The restore refuses
    each with its reason (nothing unpickled) where restoring one made the worker exit at the card's next
    event, after every restart; the card keeps its last good state, so the second half's rows are the
    reference's (windows reach across the restart), and that state is written again on its own partition,
    where it is the latest record once more."""
    from confluent_kafka import Producer

    from features.windows import FeatureLogic
    from tests.faults import pickle_trap
    from tests.kafka_helpers import produce_all, read_committed
    from tests.parity import check_resumed_rows, halves_with_a_resend, private_copy, reference_rows, valid_record

    spec, spec_path = private_copy(settings, PIPELINES / "fraud.yaml", tmp_path / "fraud.yaml")
    first, second = halves_with_a_resend(spec, seed=5)
    expected = reference_rows(spec, first + second)
    home = tmp_path / "home"
    env = {**os.environ, **stack_env, **as_role(stack_env, "features"), "EDDY_PIPELINE": str(spec_path),
           "EDDY_HOME": str(home)}
    client = redis.Redis.from_url(settings.redis_url)
    log = home / "logs" / "features-faust.log"
    warning = "changelog records are not the engine's"

    def seen(count: int):
        return lambda: any(b["valid"] + b["dlq"] + b["duplicates"] == count for b in read_metrics(client, spec.name, STAGE))

    produce_all(settings.kafka, spec.topics.source, first)
    run_until(env, "features-faust", seen(len(first)), "the first half")
    check_resumed_rows(reference_rows(spec, first), read_committed(settings.kafka, spec.topics.features,
                                                                   len(reference_rows(spec, first)), idle_s=1.0))

    changelog = f"{spec.stage_id(STAGE)}-entity-state-changelog"
    card = str(next(r[spec.key] for _, v, _ in second if (r := valid_record(spec, v)) is not None)).encode()
    marker = tmp_path / "unpickled"
    producer = Producer(settings.kafka.client())
    for partition in range(3):
        for key, value in [(card, pickle_trap(marker)), (card, b'["x", NaN]'), (b"poison-card", b"short")]:
            producer.produce(changelog, value, key, partition=partition)
    assert producer.flush(30) == 0

    def restored_then_second_half() -> None:  # produced once the restore is over: none of it meets the restore
        wait_for(lambda: log.exists() and log.read_text().count(warning) == 3, 120, "the restore to refuse the poison")
        produce_all(settings.kafka, spec.topics.source, second)

    run_until(env, "features-faust", seen(len(second)), "the second half, the card's events in it",
              restored_then_second_half)
    text = log.read_text()
    assert text.count(warning) == 3 and "JSONDecodeError" in text, text[-3000:]
    assert not marker.exists(), "something unpickled a changelog record"
    rows = read_committed(settings.kafka, spec.topics.features, len(expected), idle_s=3.0)
    check_resumed_rows(expected, rows)
    [home_partition] = {m.partition() for m in rows if orjson.loads(m.value())[spec.key] == card.decode()}
    latest = {(m.partition(), m.key()): m.value() for m in read_committed(settings.kafka, changelog, 10**9, timeout_s=10)}
    FeatureLogic(spec).loads(latest[(home_partition, card)])  # its own partition's latest: a good state again
    assert all(latest[(p, card)] == b'["x", NaN]' for p in range(3) if p != home_partition)  # the others untouched


def run_until(env: dict, part: str, done, what: str, meanwhile=lambda: None) -> None:
    """`eddy run part` in a process of its own, meanwhile() once it is started, until done(); then SIGTERM
    (SIGKILL after 60 s)."""
    worker = subprocess.Popen([sys.executable, "-m", "deploy.cli", "run", part], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def done_or_exited() -> bool:
        if worker.poll() is not None:
            pytest.fail(f"{part} exited with status {worker.returncode} before {what}")
        return done()

    try:
        meanwhile()
        wait_for(done_or_exited, 180, what)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def check_features(settings, case, client) -> dict:
    """The parity stream's features and dead letters as the reference says (check_engine_output), and the
    engine's heartbeat counting them; returns the heartbeat."""
    check_engine_output(settings, case.spec, case.expected, case.delivered, case.invalid)
    [beat] = read_metrics(client, case.spec.name, STAGE, max_age_s=300)
    assert (beat["valid"], beat["dlq"], beat["duplicates"]) == (len(case.expected), len(case.invalid), case.resent)
    return beat


def _features_rows(settings, spec, count: int) -> list[dict]:
    import orjson

    from tests.kafka_helpers import read_committed

    return [orjson.loads(m.value()) for m in read_committed(settings.kafka, spec.topics.features, count, timeout_s=30)]
