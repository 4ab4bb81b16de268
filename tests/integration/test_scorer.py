"""The scorer in a private stack: exactly one prediction per event through a kill -9, a hot swap under
load that changes the version at one point per partition, and bad updates refused while the old
model keeps serving."""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from tests.conftest import EDDY, REPO, run_eddy, stack_environment
from tests.faults import live_producer, pickle_trap, source_records
from tests.kafka_helpers import count_committed, read_committed
from tests.stack_helpers import group_lag, status, variant, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from deploy.settings import load_settings
    from features.spec import load_spec

    env = {**stack_environment(tmp_path_factory.mktemp("scoring") / "home"), "EDDY_STAGES": "split"}  # scorers apart
    settings = load_settings(environ=env)
    try:
        up = run_eddy(["up"], env)
        assert up.returncode == 0, up.stderr
        settings = load_settings(environ=env)  # signed in: `eddy up` made the stack's credentials
        assert "published the baseline model baseline-1" in up.stdout
        yield env, settings, load_spec(settings.pipeline)
    finally:
        run_eddy(["down"], env)


def produce(env, count: int, *extra: str) -> None:
    result = run_eddy(["produce", "--count", str(count), "--label-delay", "0", *extra], env)
    assert result.returncode == 0, result.stderr


def predictions(settings, spec, count: int) -> list[dict]:
    msgs = read_committed(settings.kafka, spec.topics.predictions, count, timeout_s=180, idle_s=2.0)
    return [{**orjson.loads(m.value()), "_partition": m.partition(), "_offset": m.offset()} for m in msgs]


def test_hot_swap_under_load_changes_version_at_one_point_per_partition(stack):
    from models.artifacts import verify_artifact
    from models.updates import publish

    env, settings, spec = stack
    baseline_count = count_committed(settings.kafka, spec.topics.predictions)
    directory = variant(spec, settings, "v2", 0.5)
    manifest = verify_artifact(directory, settings.signing_key(), spec.spec_hash, list(spec.model_inputs))

    import threading

    # Events flow before, during and after the publication: a stream under way when it is published,
    # and a second one produced only once it is, so every partition sees both versions whatever the
    # machine's speed.
    producer = threading.Thread(target=produce, args=(env, 5_000, "--rate", "1000"))
    producer.start()

    def flowing_in_every_partition() -> bool:
        """The baseline has scored events of this run in each partition."""
        fresh = read_committed(settings.kafka, spec.topics.predictions, 10**9, timeout_s=3)
        return len({m.partition() for m in fresh if m.timestamp()[1] / 1000 > started}) == settings.partitions

    started = time.time()
    wait_for(flowing_in_every_partition, 120, "the baseline to score the new events in every partition")
    publish(settings.kafka, spec.topics.model_updates, manifest, directory.as_uri(), settings.signing_key())
    producer.join()
    produce(env, 5_000, "--rate", "1000")

    rows = predictions(settings, spec, baseline_count + 10_000)
    assert len(rows) == baseline_count + 10_000
    assert len({r["event_id"] for r in rows}) == len(rows), "an event got two predictions"
    per_partition = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["_partition"], r["_offset"])):
        per_partition[r["_partition"]].append(r["model_version"])
    for versions in per_partition.values():
        changes = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
        assert len(changes) == 1, f"version changed {len(changes)} times in a partition"
        assert versions[0] == "baseline-1" and versions[-1] == "v2"
    scorer = status(env)["parts"]["scorer-0"]
    assert scorer["model_version"] == "v2" and scorer["updates_accepted"] >= 2


def test_forged_corrupt_and_pickled_updates_are_refused_and_the_old_model_keeps_serving(stack, tmp_path):
    from models.artifacts import WEIGHTS_FILE, model_update_message, save_artifact, verify_artifact
    from models.baseline import baseline_model
    from models.signing import SigningKey
    from tests.kafka_helpers import produce_all

    env, settings, spec = stack
    key = settings.signing_key()
    serving = status(env)["parts"]["scorer-0"]["model_version"]
    refused_before = status(env)["parts"]["scorer-0"]["updates_refused"]
    marker = tmp_path / "unpickled"

    def artifact(version: str) -> Path:
        directory = settings.artifacts_dir / spec.name / version
        model, normaliser = baseline_model(spec)
        save_artifact(directory, model, normaliser, {"version": version, "spec_hash": spec.spec_hash}, key)
        return directory

    # 1. forged: signed with another key
    forged = artifact("v-forged")
    m = verify_artifact(forged, key, spec.spec_hash, None)
    bad_sig = model_update_message(m, forged.as_uri(), SigningKey.generate())
    # 2. corrupt: the weights change after signing
    corrupt = artifact("v-corrupt")
    m_corrupt = verify_artifact(corrupt, key, spec.spec_hash, None)
    weights = corrupt / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    corrupt_msg = model_update_message(m_corrupt, corrupt.as_uri(), key)
    # 3. a pickle in place of the weights, manifest and message re-signed to match it
    pickled = artifact("v-pickle")
    (pickled / WEIGHTS_FILE).write_bytes(pickle_trap(marker))
    _resign(pickled, key)
    m_pickle = _manifest(pickled)
    pickle_msg = model_update_message(m_pickle, pickled.as_uri(), key)

    produce_all(settings.kafka, spec.topics.model_updates,
                [(None, orjson.dumps(x)) for x in (bad_sig, corrupt_msg, pickle_msg)] + [(None, b"\x80not json")])
    wait_for(lambda: status(env)["parts"]["scorer-0"]["updates_refused"] >= refused_before + 4, 60,
             "the scorer to refuse the four updates")
    before = count_committed(settings.kafka, spec.topics.predictions)
    produce(env, 500, "--backfill", "5m")
    rows = predictions(settings, spec, before + 500)
    assert {r["model_version"] for r in rows[-500:]} == {serving}
    assert not marker.exists(), "a pickle was unpickled"
    log = Path(status(env)["parts"]["scorer-0"]["log"]).read_text()
    assert "bad signature" in log and "v-corrupt" in log and "v-pickle" in log


def test_an_older_publish_is_ignored_and_rollback_and_promote_are_served(stack):
    from models.artifacts import verify_artifact
    from models.updates import publish

    env, settings, spec = stack
    key = settings.signing_key()
    scorer = status(env)["parts"]["scorer-0"]
    assert scorer["model_version"] == "v2"
    baseline = settings.artifacts_dir / spec.name / "baseline-1"
    manifest = verify_artifact(baseline, key, spec.spec_hash, None)
    publish(settings.kafka, spec.topics.model_updates, manifest, baseline.as_uri(), key)  # older: ignored
    wait_for(lambda: status(env)["parts"]["scorer-0"]["updates_ignored"] > scorer["updates_ignored"], 60,
             "the older update to be ignored")

    def serving_after(count: int) -> set[str]:
        """The versions that scored `count` events produced now (told apart by when they were scored)."""
        before = count_committed(settings.kafka, spec.topics.predictions)
        since = time.time()
        produce(env, count, "--backfill", "5m")
        rows = predictions(settings, spec, before + count)
        return {r["model_version"] for r in rows if datetime.fromisoformat(r["scored_at"]).timestamp() >= since}

    assert serving_after(300) == {"v2"}
    rolled = run_eddy(["rollback"], env)
    assert rolled.returncode == 0 and "rolled back to baseline-1" in rolled.stdout, rolled.stderr
    wait_for(lambda: status(env)["parts"]["scorer-0"]["updates_accepted"] > scorer["updates_accepted"], 60,
             "the rollback to load")
    assert serving_after(300) == {"baseline-1"}
    promoted = run_eddy(["promote", "v2"], env)
    assert promoted.returncode == 0, promoted.stderr
    wait_for(lambda: status(env)["parts"]["scorer-0"]["updates_accepted"] > scorer["updates_accepted"] + 1, 60,
             "the promotion to load")
    assert serving_after(300) == {"v2"}

    # The rollback replayed (its signed bytes copied off the topic) and the promote duplicated: signed by
    # the trusted key, but not after the last message taken, so both are ignored and counted; no reload.
    from tests.kafka_helpers import produce_all

    copied = {}
    for m in read_committed(settings.kafka, spec.topics.model_updates, 10**6, timeout_s=5):
        try:  # the earlier test left records that are not JSON on the topic
            copied[orjson.loads(m.value()).get("action")] = m.value()  # the last of each action
        except (orjson.JSONDecodeError, AttributeError):
            continue
    part = status(env)["parts"]["scorer-0"]
    produce_all(settings.kafka, spec.topics.model_updates, [(None, copied["rollback"]), (None, copied["promote"])])
    wait_for(lambda: status(env)["parts"]["scorer-0"]["updates_replayed"] >= part["updates_replayed"] + 2, 60,
             "the replayed rollback and the duplicate promote to be ignored")
    assert status(env)["parts"]["scorer-0"]["updates_accepted"] == part["updates_accepted"]
    assert serving_after(300) == {"v2"}
    log = Path(part["log"]).read_text()
    assert "(rollback, seq" in log and "a replay or a duplicate" in log
    listed = orjson.loads(run_eddy(["models", "--json"], env).stdout)
    assert [m["version"] for m in listed if m["serving"]] == ["v2"]
    assert {"baseline-1", "v2"} <= {m["version"] for m in listed}
    bad = run_eddy(["promote", "v-none"], env)
    assert bad.returncode == 1 and "no model version 'v-none'" in bad.stderr and "Traceback" not in bad.stderr


def test_kill_9_of_the_scorer_mid_stream_gives_exactly_one_prediction_per_event(stack):
    """A backlog, then a live stream during which the scorer is killed: the supervisor brings it back
    by itself, and every event still has exactly one prediction, whatever the machine's speed."""
    env, settings, spec = stack
    before = count_committed(settings.kafka, spec.topics.predictions)
    sources = source_records(settings.kafka, spec.topics.source)
    produce(env, 5_000, "--backfill", "30m")
    group = spec.stage_id("scorer")
    wait_for(lambda: len(read_committed(settings.kafka, spec.topics.predictions, before + 3000, timeout_s=1))
             >= before + 3000, 120, "predictions to flow")
    part = status(env)["parts"]["scorer-0"]
    restarts, pid = part["restarts"], part["pid"]
    live = live_producer(EDDY, env, REPO, rate=2000, count=10_000, seed=5)
    wait_for(lambda: source_records(settings.kafka, spec.topics.source) > sources + 5_500 or live.poll() is not None,
             60, "the live stream to start")
    os.kill(pid, signal.SIGKILL)
    assert live.poll() is None, "the live stream ended before the kill"
    _, errors = live.communicate(timeout=120)
    assert live.returncode == 0, errors
    wait_for(lambda: status(env)["parts"]["scorer-0"]["restarts"] > restarts, 60, "the supervisor to restart it")
    wait_for(lambda: group_lag(env, group, spec.topics.features) == 0, 300, "the scorer to catch up")
    part = status(env)["parts"]["scorer-0"]
    assert part["state"] == "up" and part["last_exit_code"] == -signal.SIGKILL and "SIGKILL" in part["last_reason"]
    rows = predictions(settings, spec, before + 15_000)
    ids = [r["event_id"] for r in rows]
    assert len(ids) == before + 15_000 and len(set(ids)) == len(ids)
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)


def _manifest(directory: Path):
    import json

    from models.manifest import Manifest

    data = json.loads((directory / "manifest.json").read_text())
    return Manifest(**{k: v for k, v in data.items() if k in Manifest.__dataclass_fields__})


def _resign(directory: Path, key) -> None:
    """Recompute sha256 and signature of a manifest after its weights file was replaced."""
    import hashlib
    import json

    from models.artifacts import sign_message

    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["sha256"] = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    data.pop("signature")
    data["signature"] = sign_message(data, key)
    path.write_text(json.dumps(data))
