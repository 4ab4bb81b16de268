"""The Flink engine on eddy's own session cluster (`eddy up --object-store --flink-cluster`): a JobManager and
two one-slot TaskManagers as processes of their own, the job at parallelism 2 with RocksDB state and its
checkpoints on the object store, kept on the cluster by the features-flink part (deploy.flink_keeper).

Three faults fall into live streams, and each time the stack heals by itself: a TaskManager killed (the
supervisor starts another, Flink restores the last checkpoint), the JobManager killed (the supervisor
starts another, empty; the keeper submits the job again from the newest retained checkpoint), the keeper
killed (its replacement adopts the running job, submitting none). The checker then finds every event with
exactly one features row and one prediction, equal to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal

import pytest

from deploy import flink_cluster
from deploy.settings import load_settings
from tests.conftest import run_eddy, stack_environment
from tests.faults import BACKLOG, LIVE, check_exactly_once, during_a_live_stream
from tests.stack_helpers import status, wait_for

pytestmark = [pytest.mark.flink, pytest.mark.kafka, pytest.mark.redis, pytest.mark.distributed, pytest.mark.chaos,
              pytest.mark.slow]


def live_jobs(rest: flink_cluster.Rest) -> list[dict]:
    from deploy.flink_keeper import LIVE_STATES

    return [j for j in rest.get("/jobs/overview")["jobs"] if j["state"] in LIVE_STATES]


def test_the_job_on_eddys_session_cluster_heals_from_a_taskmanager_the_jobmanager_and_its_keeper_killed(tmp_path):
    env = {**stack_environment(tmp_path / "home"), "EDDY_STAGES": "split"}
    try:
        up = run_eddy(["up", "--object-store", "--flink-cluster"], env, timeout=420)
        assert up.returncode == 0, up.stderr
        settings = load_settings(environ=env)  # later commands find the cluster and the store this home made
        assert settings.flink_cluster.startswith("127.0.0.1:")
        produced = run_eddy(["produce", "--count", str(BACKLOG), "--backfill", "1h", "--label-delay", "0", "--seed", "3"],
                            env)
        assert produced.returncode == 0, produced.stderr
        settings = load_settings(environ=env)
        spec, rest = settings.pipeline_spec(), flink_cluster.rest(settings)
        wait_for(lambda: status(env)["parts"]["features-flink"].get("events", 0) >= BACKLOG, 180, "the backlog")
        parts = status(env)["parts"]
        cluster = ("flink-jobmanager", "flink-taskmanager-1", "flink-taskmanager-2", "features-flink")
        assert {parts[p]["state"] for p in cluster} == {"up"}, {p: parts[p]["state"] for p in cluster}
        assert parts["features-flink"]["replicas"] == 2, "each subtask beats"
        [job] = live_jobs(rest)
        assert [v["parallelism"] for v in rest.job(job["jid"])["vertices"]] == [2] * len(rest.job(job["jid"])["vertices"])
        assert rest.get(f"/jobs/{job['jid']}/checkpoints/config")["state_backend"] == "EmbeddedRocksDBStateBackend"

        # 1. A TaskManager killed: the supervisor starts another and Flink restores the last checkpoint.
        victim = parts["flink-taskmanager-1"]["pid"]
        took = during_a_live_stream(env, settings, spec, lambda: os.kill(victim, signal.SIGKILL), seed=4)
        restored = rest.checkpoints(job["jid"])["latest"]["restored"]
        assert restored is not None and restored["external_path"].startswith("s3://eddy/lakehouse/_flink/checkpoints/")
        print(f"\nTaskManager killed -> every stage at lag 0: {took:.1f}s")

        # 2. The JobManager killed: it comes back with no job; the keeper submits it from the newest checkpoint.
        jobmanager = status(env)["parts"]["flink-jobmanager"]["pid"]
        took = during_a_live_stream(env, settings, spec, lambda: os.kill(jobmanager, signal.SIGKILL), seed=5,
                                    before=BACKLOG + LIVE)
        [resubmitted] = live_jobs(rest)
        assert resubmitted["jid"] != job["jid"]
        restored = rest.checkpoints(resubmitted["jid"])["latest"]["restored"]
        assert restored["external_path"].startswith(f"s3://eddy/lakehouse/_flink/checkpoints/{job['jid']}/chk-")
        print(f"JobManager killed -> the job resubmitted from {restored['external_path']}, every stage at lag 0: {took:.1f}s")

        # 3. The keeper killed: its replacement keeps the running job.
        keeper = status(env)["parts"]["features-flink"]["pid"]
        os.kill(keeper, signal.SIGKILL)
        wait_for(lambda: (p := status(env)["parts"]["features-flink"])["state"] == "up" and p["pid"] != keeper, 120,
                 "a new keeper")
        assert [j["jid"] for j in live_jobs(rest)] == [resubmitted["jid"]], "the new keeper submitted a second job"
        # its own count, once the killed keeper's last heartbeat (status sums the last 10 s of beats) is stale
        wait_for(lambda: status(env)["parts"]["features-flink"].get("submits") == 0, 60, "the new keeper's beat alone")
        assert [j["jid"] for j in live_jobs(rest)] == [resubmitted["jid"]]

        check_exactly_once(settings.kafka, spec, BACKLOG + 2 * LIVE)
        restarts = {p: status(env)["parts"][p]["restarts"] for p in ("flink-jobmanager", "flink-taskmanager-1", "features-flink")}
        assert restarts == {"flink-jobmanager": 1, "flink-taskmanager-1": 1, "features-flink": 1}, restarts
        assert json.loads((tmp_path / "home" / "run" / "flink-job.json").read_text())["job"] == resubmitted["jid"]
    finally:
        run_eddy(["down"], env)
