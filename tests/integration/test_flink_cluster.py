"""The Flink feature job on a standalone session cluster (deploy.flink_cluster): a JobManager and two
TaskManagers as processes of their own, the job at parallelism 2 with RocksDB state and its checkpoints
on the object store (s3:// beside an s3a:// lakehouse, on the local S3Proxy). A TaskManager killed mid-stream is replaced, the job restores its last checkpoint, and
every event has its reference row exactly once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy import flink_cluster, object_store
from deploy.processes import ProcessTable, free_port
from deploy.settings import Settings, load_settings
from tests.kafka_helpers import produce_all, read_committed
from tests.parity import (
    as_role,
    check_resumed_rows,
    dead_letters,
    halves_with_a_resend,
    make_stream,
    private_copy,
    reference_rows,
)
from tests.stack_helpers import wait_for

pytestmark = [pytest.mark.flink, pytest.mark.kafka, pytest.mark.redis, pytest.mark.distributed]

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


@dataclass(frozen=True)
class Cluster:
    settings: Settings  # the job's: its spec, the features role, the cluster's address
    table: ProcessTable
    role: dict[str, str]
    rest: flink_cluster.Rest


@pytest.fixture
def cluster(settings, stack_env, tmp_path) -> Iterator[Cluster]:
    """A session cluster of two one-slot TaskManagers in a home of its own, for a private copy of the
    fraud spec; stopped at the end whatever happened."""
    _spec, spec_path = private_copy(settings, PIPELINES / "fraud.yaml", tmp_path / "fraud.yaml")
    role = as_role(stack_env, "features")
    job_settings = load_settings(environ={
        **stack_env, **role, "EDDY_HOME": str(tmp_path / "home"), "EDDY_PIPELINE": str(spec_path),
        "EDDY_FLINK_CLUSTER": f"127.0.0.1:{free_port()}", "EDDY_FLINK_TASKMANAGERS": "2",
        "EDDY_LAKEHOUSE": "s3a://eddy/lakehouse", "EDDY_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    table = ProcessTable(job_settings.run_dir, job_settings.logs_dir)
    try:
        started = time.monotonic()
        object_store.ensure_object_store(job_settings, table)
        flink_cluster.ensure_cluster(job_settings, table)
        print(f"\nsession cluster up (JobManager + 2 TaskManagers) in {time.monotonic() - started:.1f}s")
        yield Cluster(job_settings, table, role, flink_cluster.rest(job_settings))
    finally:
        flink_cluster.stop_cluster(job_settings, table)
        table.stop(object_store.NAME)


def submit(cluster: Cluster, parallelism: int) -> str:
    settings = cluster.settings.with_overrides(flink_parallelism=parallelism)
    return flink_cluster.submit_job(settings, cluster.role)


def test_a_killed_taskmanager_is_replaced_and_the_job_resumes_exactly_once(settings, cluster):
    spec = cluster.settings.pipeline_spec()
    first, second = halves_with_a_resend(spec, seed=7)
    stream = first + second
    expected = reference_rows(spec, stream)

    produce_all(settings.kafka, spec.topics.source, first)
    job = submit(cluster, parallelism=2)
    try:
        seen = read_committed(settings.kafka, spec.topics.features, len(reference_rows(spec, first)), timeout_s=180)
        assert len(seen) == len(reference_rows(spec, first)), "the first half did not come through"
        assert [v["parallelism"] for v in cluster.rest.job(job)["vertices"]] == [2] * len(
            cluster.rest.job(job)["vertices"])
        assert cluster.rest.get(f"/jobs/{job}/checkpoints/config")["state_backend"] == "EmbeddedRocksDBStateBackend"
        before = cluster.rest.checkpoints(job)["counts"]

        produce_all(settings.kafka, spec.topics.source, second)
        victim = cluster.table.get(flink_cluster.taskmanager_name(1))
        assert victim is not None
        os.killpg(victim.pid, signal.SIGKILL)  # no chance to clean up: open transactions, state in flight
        killed = time.monotonic()
        flink_cluster.start_taskmanager(cluster.settings, cluster.table, 1)  # as supervision would

        wait_for(lambda: cluster.rest.checkpoints(job)["counts"]["restored"] > before["restored"], 180,
                 "the job to restore a checkpoint")
        wait_for(lambda: cluster.rest.running(job), 180, "every task to run again")
        print(f"TaskManager killed -> job restored and running on the replacement: {time.monotonic() - killed:.1f}s")

        rows = read_committed(settings.kafka, spec.topics.features, len(expected), timeout_s=180, idle_s=3.0)
        print(f"TaskManager killed -> every row committed: {time.monotonic() - killed:.1f}s")
        letters = read_committed(settings.kafka, spec.topics.dlq, len(dead_letters(spec, stream)), idle_s=1.0)
        restored = cluster.rest.checkpoints(job)["latest"]["restored"]
    finally:
        cluster.rest.cancel(job)

    check_resumed_rows(expected, rows)
    assert len(letters) == len(dead_letters(spec, stream))
    assert restored is not None and not restored["is_savepoint"]
    assert restored["id"] >= before["completed"] >= 1, "it did not restore the checkpoint the first half made"
    assert restored["external_path"].startswith("s3://eddy/lakehouse/_flink/checkpoints/"), restored["external_path"]


@pytest.mark.slow
def test_drain_rate_at_parallelism_1_and_2(settings, cluster, tmp_path):
    """Prints the job's rate draining a backlog at parallelism 1, then 2 (each a job of its own spec copy,
    so its own topics, group and transactions); asserts only that every row came."""
    for parallelism in (1, 2):
        spec, spec_path = private_copy(settings, PIPELINES / "fraud.yaml", tmp_path / f"p{parallelism}.yaml")
        stream = make_stream(spec, seed=3, entities=DRAIN_ENTITIES, per_entity=DRAIN_PER_ENTITY)
        expected = len(reference_rows(spec, stream))
        produce_all(settings.kafka, spec.topics.source, stream)
        job = flink_cluster.submit_job(cluster.settings.with_overrides(pipeline=spec_path,
                                                                       flink_parallelism=parallelism), cluster.role)
        try:
            count, seconds = drain(settings, spec.topics.features, expected)
        finally:
            cluster.rest.cancel(job)
        print(f"\nparallelism {parallelism}: {len(stream)} events, {count} rows committed in {seconds:.1f}s "
              f"from the first commit: {len(stream) / seconds:.0f} events/s")
        assert count == expected


DRAIN_ENTITIES, DRAIN_PER_ENTITY = 400, 100


def drain(settings, topic: str, count: int, timeout_s: float = 600.0) -> tuple[int, float]:
    """(rows read, seconds from the first committed row to the count-th) of a read_committed reader."""
    import uuid

    from confluent_kafka import Consumer

    consumer = Consumer(settings.kafka.client(**{
        "group.id": f"drain-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": "read_committed"}))
    consumer.subscribe([topic])
    seen, first, deadline = 0, 0.0, time.monotonic() + timeout_s
    try:
        while seen < count and time.monotonic() < deadline:
            got = sum(1 for m in consumer.consume(5000, 0.2) if m.error() is None)
            if got and not seen:
                first = time.monotonic()
            seen += got
    finally:
        consumer.close()
    return seen, time.monotonic() - first
