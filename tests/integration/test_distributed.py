"""The loop on the distributed topology: `eddy up --distributed --engine flink` runs three brokers, the Flink
feature job on a session cluster (a JobManager and two TaskManagers, parallelism 2), keeps the lakehouse
and the model artifacts on an S3-compatible store and runs ingestion and every Spark command on a
standalone master and worker. Every event has exactly one features row and one prediction, equal to an
uninterrupted run's, and one row per table; delta-rs reads every table from the store with Spark's
numbers; a retrain's artifact lands in the store, and the scorer, which did not write it and has no
copy of it on disk, fetches, verifies and serves it."""

from __future__ import annotations

import json
import shutil

import pytest

from deploy.settings import load_settings
from tests.conftest import run_eddy, stack_environment
from tests.faults import check_exactly_once
from tests.stack_helpers import wait_for

# 461-537 s on 2 cores with 4,000 events (the Flink job drains ~500 events/s on this topology)
pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.spark, pytest.mark.flink, pytest.mark.distributed,
              pytest.mark.slow, pytest.mark.timeout(1500)]

EVENTS = 4000
TABLES = ("bronze.transactions", "bronze.labels", "silver.features", "gold.predictions")


def lake_rows(settings, path: str, columns: list[str]) -> list[dict]:
    """A table's rows as delta-rs reads them from the store (with the store's keys, as a process of the
    stack has them), or [] before the table exists."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(f"{settings.lakehouse}/{path}", storage_options=settings.object_store.environment())
    except TableNotFoundError:
        return []
    return table.to_pyarrow_dataset().to_table(columns=columns).to_pylist()


def test_the_loop_runs_flink_and_spark_on_their_clusters_and_keeps_the_lake_and_the_models_on_the_store(tmp_path):
    home = tmp_path / "home"
    env = {**stack_environment(home), "EDDY_ENGINE": "flink", "EDDY_INGEST": "on", "EDDY_INGEST_TRIGGER": "1s"}
    try:
        up = run_eddy(["up", "--distributed"], env, timeout=600)
        assert up.returncode == 0, up.stderr
        settings = load_settings(environ=env)  # later commands find the store and the cluster this home made
        assert settings.lakehouse == "s3a://eddy/lakehouse" and settings.spark_master.startswith("spark://127.0.0.1:")
        assert settings.flink_cluster.startswith("127.0.0.1:") and len(settings.kafka.bootstrap.split(",")) == 3
        status = json.loads(run_eddy(["status", "--json"], env).stdout)["parts"]
        parts = ("broker", "broker-2", "broker-3", "objectstore", "spark-master", "spark-worker", "lakehouse",
                 "flink-jobmanager", "flink-taskmanager-1", "flink-taskmanager-2", "features-flink", "scorer-0",
                 "online-writer")
        assert {status[p]["state"] for p in parts} == {"up"}, {p: status.get(p, {}).get("state") for p in parts}
        assert status["objectstore"]["lakehouse"] == "s3a://eddy/lakehouse"
        assert {status[p]["address"] for p in ("flink-jobmanager", "flink-taskmanager-1", "flink-taskmanager-2")} \
            == {settings.flink_cluster}
        assert not (home / "lakehouse").exists(), "nothing of the lake is kept on local disk"

        produced = run_eddy(["produce", "--count", str(EVENTS), "--backfill", "12h", "--label-delay", "0", "--seed", "5",
                             "--fraud-rate", "0.03"], env)
        assert produced.returncode == 0, produced.stderr

        def counts() -> dict[str, int]:
            return {name: len(lake_rows(settings, name.replace(".", "/"), ["event_id"])) for name in TABLES}
        wait_for(lambda: min(counts().values()) >= EVENTS, 420, "every event in every table on the store")
        check_exactly_once(settings.kafka, settings.pipeline_spec(), EVENTS)  # through the Flink job and the scorer
        for name in TABLES:  # exactly once through the stages and ingestion
            ids = [r["event_id"] for r in lake_rows(settings, name.replace(".", "/"), ["event_id"])]
            assert len(ids) == len(set(ids)) == EVENTS, name

        # Spark on the cluster reads the same tables from the store with the same numbers.
        statement = " UNION ALL ".join(f"SELECT '{name}' AS t, count(*) AS n, count(DISTINCT event_id) AS d FROM {name}"
                                       for name in TABLES)
        queried = run_eddy(["query", statement, "--format", "json"], env, timeout=420)
        assert queried.returncode == 0, queried.stderr
        spark = {row["t"]: (row["n"], row["d"]) for row in map(json.loads, queried.stdout.splitlines())}
        assert spark == {name: (EVENTS, EVENTS) for name in TABLES}

        # A retrain on the cluster: its artifact is published to the store, then this host's copy is removed,
        # so the scorer can only have it from the store.
        retrained = run_eddy(["retrain", "--publish", "always", "--epochs", "2"], env, timeout=600)
        assert retrained.returncode == 0, retrained.stderr
        registry = lake_rows(settings, "gold/models", ["version", "uri", "sha256"])
        assert len(registry) == 1
        version, uri = registry[0]["version"], registry[0]["uri"]
        assert uri == f"s3://eddy/lakehouse/models/{settings.pipeline_spec().name}/{version}"
        stored = settings.object_store.filesystem().get_file_info(
            [f"eddy/lakehouse/models/{settings.pipeline_spec().name}/{version}/{f}" for f in ("manifest.json", "model.safetensors")])
        assert all(info.size and info.size > 0 for info in stored)
        shutil.rmtree(home / "models")

        def serving() -> str | None:
            return json.loads(run_eddy(["status", "--json"], env).stdout)["parts"]["scorer-0"].get("model_version")
        wait_for(lambda: serving() == version, 120, f"the scorer to serve {version} from the store")

        # `eddy models` on this host lists it again, mirrored from the store.
        listed = run_eddy(["models", "--json"], env)
        assert listed.returncode == 0, listed.stderr
        models = {m["version"]: m for m in json.loads(listed.stdout)}
        assert models[version]["serving"] and models[version]["uri"] == uri
    finally:
        run_eddy(["down"], env)
