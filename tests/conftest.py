"""Shared fixtures: the real local stack (broker + Redis) on free loopback ports, once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# As in deploy/cli.py: prometheus_client before Feast, whose import switches it to multi-process mode.
import prometheus_client  # noqa: F401
import pytest

REPO = Path(__file__).resolve().parent.parent
EDDY = [sys.executable, "-m", "deploy.cli"]


def stack_environment(home: Path) -> dict[str, str]:
    """EDDY_* variables for a private stack: its own home and free loopback ports."""
    from deploy.processes import free_port

    return {
        "EDDY_HOME": str(home),
        "EDDY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "EDDY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "EDDY_PIPELINE": str(REPO / "pipelines" / "fraud.yaml"),
        "EDDY_MODEL_KEY": "7e57" * 16,
        # Spark ingestion costs ~1.3 GB and a core: only the tests of the lakehouse turn it on.
        "EDDY_INGEST": "off",
    }


def run_eddy(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process, as a user would."""
    full = {**os.environ, **env}
    return subprocess.run([*EDDY, *args], env=full, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running broker and Redis for the whole session; stopped at the end whatever happened."""
    from deploy import stack
    from deploy.settings import load_settings

    env = stack_environment(tmp_path_factory.mktemp("eddy-home"))
    settings = load_settings(environ=env)
    try:
        report = stack.up(settings, with_components=False)  # tests start the components they exercise
        # the stack is secure: processes with homes of their own sign in as its admin
        yield {**env, **signed_in(report.settings or settings)}
    finally:
        stack.down(settings)


def signed_in(settings) -> dict[str, str]:
    """EDDY_* variables that sign a process of any home in to this secure local stack as its admin:
    its client file and its Redis URL (as a user points eddy at an existing secure cluster)."""
    from deploy.security import kafka_client_file

    out = {"EDDY_REDIS_URL": settings.redis_url}
    if settings.kafka.properties:
        out["EDDY_KAFKA_CONFIG"] = str(kafka_client_file(settings.home, "admin"))
    return out


@pytest.fixture(scope="session")
def settings(stack_env: dict[str, str]):
    """Settings of the session's broker and Redis."""
    from deploy.settings import load_settings

    return load_settings(environ=stack_env)


@pytest.fixture(scope="session")
def redis_settings(tmp_path_factory: pytest.TempPathFactory):
    """Settings of a redis-server of its own (no broker: its Kafka address answers nothing), for the
    tests that need Redis alone."""
    from deploy import redis_local, stack
    from deploy.settings import load_settings, local_credentials

    settings = load_settings(environ=stack_environment(tmp_path_factory.mktemp("eddy-redis")))
    try:
        redis_local.ensure_redis(settings, stack.process_table(settings))
        yield local_credentials(settings)
    finally:
        stack.down(settings)


@pytest.fixture(scope="session")
def spark():
    """One Spark session (local[2], the Delta and Kafka jars) for every test of the run that needs one."""
    from lakehouse.session import SparkConfig, start_session

    conf = {"spark.databricks.delta.snapshotPartitions": "2", "spark.ui.showConsoleProgress": "false",
            "spark.sql.shuffle.partitions": "4"}
    session = start_session(SparkConfig(REPO / ".jars", master="local[2]", conf=conf))
    yield session
    session.stop()


# Which markers a test must carry for the services its fixtures start, so `-m` selections hold.
_SERVICE_FIXTURES = {"stack_env": "kafka", "settings": "kafka", "fresh_topic": "kafka", "redis_settings": "redis",
                     "spark": "spark"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """tests/integration carries `integration`, tests/e2e `e2e`; a unit test starts no service, and a
    test that starts a service through a fixture carries that service's marker."""
    wrong = []
    for item in items:
        folder = Path(item.fspath).relative_to(REPO / "tests").parts[0]
        if folder in ("integration", "e2e"):
            item.add_marker(folder)
        needs = {_SERVICE_FIXTURES[f] for f in getattr(item, "fixturenames", ()) if f in _SERVICE_FIXTURES}
        if folder == "unit" and needs:
            wrong.append(f"{item.nodeid}: a unit test uses {', '.join(sorted(needs))} (move it to tests/integration)")
        missing = needs - {m.name for m in item.iter_markers()}
        if missing:
            wrong.append(f"{item.nodeid}: starts {', '.join(sorted(missing))} without the marker")
    if wrong:
        raise pytest.UsageError("tests whose markers do not hold:\n  " + "\n  ".join(wrong))


@pytest.fixture
def fresh_topic(settings) -> Iterator[str]:
    """A topic of its own for one test (3 partitions), so tests never see each other's records."""
    import uuid

    from streams.kafka import ensure_topics

    name = f"t-{uuid.uuid4().hex[:10]}"
    ensure_topics(settings.kafka, [name], partitions=3)
    yield name


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Whatever a test left running (a stack whose test failed before its `eddy down`) is stopped:
    every process whose EDDY_HOME lies under this run's temporary folder."""
    import signal

    import psutil

    try:
        base = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return
    leftovers = []
    for proc in psutil.process_iter(["pid"]):
        try:
            home = proc.environ().get("EDDY_HOME", "")
        except (psutil.Error, OSError):
            continue
        if home.startswith(base) and proc.pid != os.getpid():
            leftovers.append(proc)
    for proc in leftovers:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    psutil.wait_procs(leftovers, timeout=10)
