"""The Flink feature engine through the real broker and Redis: over a stream with every awkward case the
bounded job gives, for both shipped specs, the naive reference's numbers exactly once; a job killed mid-stream
resumes from its checkpoint with nothing lost or doubled. Plus the job's pure helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from streams.engines.config import STAGE
from streams.metrics import read_metrics
from tests.kafka_helpers import produce_all, read_committed
from tests.parity import (
    as_role,
    check_engine_output,
    check_resumed_rows,
    dead_letters,
    halves_with_a_resend,
    parity_case,
    private_copy,
    reference_rows,
)

pytestmark = [pytest.mark.flink, pytest.mark.kafka, pytest.mark.redis]

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines"


# The job runs in a process of its own, as under `eddy up`: PyFlink's JVM lives as long as the process
# that started it, and the test process stays free of it.
RUN_JOB = """
import sys
from dataclasses import replace
from pathlib import Path
from deploy.components import engine_config
from deploy.settings import load_settings
from features.spec import load_spec
from streams.engines.flink_job import run_job
settings = load_settings()
config = engine_config(settings, load_spec(settings.pipeline), bounded=sys.argv[2] == "bounded")
run_job(replace(config, data_dir=Path(sys.argv[1])))
"""


def job_command(stack_env: dict[str, str], spec_path: Path, data_dir: Path, mode: str) -> dict:
    return {"args": [sys.executable, "-c", RUN_JOB, str(data_dir), mode], "cwd": REPO,
            # the JVM's log beside the job's data, as child_environment puts it for `eddy up`
            "env": {**os.environ, **stack_env, **as_role(stack_env, "features"), "EDDY_PIPELINE": str(spec_path),
                    "FLINK_LOG_DIR": str(data_dir / "log")}}


def run_bounded(stack_env: dict[str, str], spec_path: Path, data_dir: Path) -> None:
    done = subprocess.run(**job_command(stack_env, spec_path, data_dir, "bounded"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def start_unbounded(stack_env: dict[str, str], spec_path: Path, data_dir: Path, log: Path) -> subprocess.Popen:
    """The job as `eddy up` runs it, in a session of its own so that its JVM can be killed with it."""
    with log.open("ab") as out:
        return subprocess.Popen(**job_command(stack_env, spec_path, data_dir, "unbounded"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(job: subprocess.Popen, sig: int) -> None:
    os.killpg(job.pid, sig)
    job.wait(60)


@pytest.mark.parametrize("pipeline", ["fraud.yaml", "sensors.yaml"])
def test_bounded_job_matches_the_naive_reference_exactly_once(settings, stack_env, tmp_path, pipeline):
    case = parity_case(settings, PIPELINES / pipeline, tmp_path / pipeline)
    spec, expected, invalid, resent = case.spec, case.expected, case.invalid, case.resent
    run_bounded(stack_env, case.spec_path, tmp_path / "flink")

    check_engine_output(settings, spec, expected, case.delivered, invalid, carries_timestamps=False)

    # The job's own counts, as its heartbeat reported them last.
    [beat] = read_metrics(redis.Redis.from_url(settings.redis_url), spec.name, STAGE, max_age_s=120)
    assert (beat["valid"], beat["dlq"], beat["duplicates"]) == (len(expected), len(invalid), resent)
    assert beat["engine"] == "flink"
    assert resent >= 5


def test_a_killed_job_resumes_from_its_last_checkpoint_exactly_once(settings, stack_env, tmp_path):
    spec, spec_path = private_copy(settings, PIPELINES / "fraud.yaml", tmp_path / "fraud.yaml")
    first, second = halves_with_a_resend(spec, seed=5)
    stream = first + second
    expected = reference_rows(spec, stream)
    data_dir, log = tmp_path / "flink", tmp_path / "job.log"

    produce_all(settings.kafka, spec.topics.source, first)
    job = start_unbounded(stack_env, spec_path, data_dir, log)
    try:
        seen = read_committed(settings.kafka, spec.topics.features, len(reference_rows(spec, first)), timeout_s=120)
        assert len(seen) == len(reference_rows(spec, first)), log.read_text()[-3000:]
    finally:
        kill(job, signal.SIGKILL)  # no chance to clean up: open transactions, no final checkpoint

    produce_all(settings.kafka, spec.topics.source, second)
    job = start_unbounded(stack_env, spec_path, data_dir, log)
    try:
        rows = read_committed(settings.kafka, spec.topics.features, len(expected), timeout_s=120, idle_s=3.0)
        letters = read_committed(settings.kafka, spec.topics.dlq, len(dead_letters(spec, stream)), idle_s=1.0)
    finally:
        kill(job, signal.SIGTERM)  # as `eddy down` stops it

    check_resumed_rows(expected, rows)
    assert len(letters) == len(dead_letters(spec, stream))
    [flink_log] = (data_dir / "log").glob("flink-*.log")  # the second run's: each run starts it anew
    assert "Restoring job" in flink_log.read_text(errors="replace"), "it did not restore a checkpoint"
