"""The Flink job keeper's decisions (deploy.flink_keeper) that need no cluster: which job on the cluster is
its own, which retained checkpoint a resubmit starts from, and what `eddy up --flink-cluster` records."""

from __future__ import annotations

from deploy.flink_cluster import Rest
from deploy.flink_keeper import checkpoint_exists, latest_checkpoint, live_job
from deploy.home_records import distributed_flags, local_flink_flags, record_flink_cluster
from deploy.settings import load_settings


class _Jobs(Rest):
    """The REST API's /jobs/overview answer, as the JobManager gives it."""

    def __init__(self, jobs: list[dict]) -> None:
        super().__init__("127.0.0.1", 1)
        self.jobs = jobs

    def get(self, path: str, timeout_s: float = 5.0):
        assert path == "/jobs/overview"
        return {"jobs": self.jobs}


def test_the_keeper_adopts_the_newest_live_job_of_its_own_name_only():
    jobs = [{"jid": "old", "name": "eddy-fraud-features", "state": "RESTARTING", "start-time": 1},
            {"jid": "new", "name": "eddy-fraud-features", "state": "RUNNING", "start-time": 2},
            {"jid": "done", "name": "eddy-fraud-features", "state": "CANCELED", "start-time": 3},
            {"jid": "other", "name": "eddy-sensors-features", "state": "RUNNING", "start-time": 4}]
    assert live_job(_Jobs(jobs), "eddy-fraud-features") == "new"
    assert live_job(_Jobs(jobs[2:]), "eddy-fraud-features") is None


def test_a_resubmit_starts_from_the_newest_complete_checkpoint_of_the_last_job(tmp_path):
    settings = load_settings(environ={"EDDY_HOME": str(tmp_path / "home")})
    root = settings.home / "flink" / "checkpoints" / "job1"
    for n, complete in ((7, True), (9, True), (10, False)):  # chk-10 is still being written
        (root / f"chk-{n}").mkdir(parents=True)
        if complete:
            (root / f"chk-{n}" / "_metadata").write_bytes(b"x")
    (root / "shared").mkdir()
    assert settings.flink_checkpoint_uri.startswith("file://")
    latest = latest_checkpoint(settings, "job1")
    assert latest == f"{settings.flink_checkpoint_uri}/job1/chk-9"
    assert checkpoint_exists(settings, latest) and not checkpoint_exists(settings, f"{settings.flink_checkpoint_uri}/job1/chk-10")
    assert latest_checkpoint(settings, "job2") is None


def test_the_home_records_its_flink_cluster_for_later_commands(tmp_path):
    home = tmp_path / "home"
    first = local_flink_flags(home)["flink_cluster"]
    assert first.startswith("127.0.0.1:")
    record_flink_cluster(home, first)
    assert local_flink_flags(home) == {"flink_cluster": first}
    assert load_settings(environ={"EDDY_HOME": str(home)}).flink_cluster == first
    assert load_settings(environ={"EDDY_HOME": str(home), "EDDY_FLINK_CLUSTER": "10.0.0.5:8081"}).flink_cluster == "10.0.0.5:8081"
    flink = distributed_flags(home, None, "flink", 1)
    assert flink["flink_cluster"] == first and "engine_workers" not in flink and flink["brokers"] == 3
    assert distributed_flags(home, None, "native", 1)["engine_workers"] == 2
