"""The Faust and native feature engines through the real broker and Redis: for both shipped specs, the
stream with every awkward case gives the naive reference's numbers, exactly once, as
`eddy run features-<engine>` runs it. (The Flink engine has its own test: tests/integration/test_flink_engine.py.)"""

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
from tests.integration.test_flink_engine import PIPELINES, REPO
from tests.parity import as_role, check_engine_output, parity_case
from tests.stack_helpers import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.mark.parametrize("engine", ["faust", "native"])
@pytest.mark.parametrize("pipeline", ["fraud.yaml", "sensors.yaml"])
def test_engine_matches_the_naive_reference_exactly_once(settings, stack_env, tmp_path, pipeline, engine):
    case = parity_case(settings, PIPELINES / pipeline, tmp_path / pipeline)
    spec, spec_path, stream = case.spec, case.spec_path, case.stream

    env = {**os.environ, **stack_env, **as_role(stack_env, "features"), "EDDY_PIPELINE": str(spec_path),
           "EDDY_HOME": str(tmp_path / "home")}
    worker = subprocess.Popen([sys.executable, "-m", "deploy.cli", "run", f"features-{engine}"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        wait_for(lambda: any(b["valid"] + b["dlq"] + b["duplicates"] == len(stream)
                             for b in read_metrics(client, spec.name, STAGE)), 180, "the worker to see every record")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()

    check_engine_output(settings, spec, case.expected, case.delivered, case.invalid)
    [beat] = read_metrics(client, spec.name, STAGE, max_age_s=300)
    assert (beat["valid"], beat["dlq"], beat["duplicates"]) == (len(case.expected), len(case.invalid), case.resent)
    assert beat["engine"] == engine
    assert Path(tmp_path / "home" / "logs" / f"features-{engine}.log").exists()
