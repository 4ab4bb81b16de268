"""What `eddy up` records in a home so that later commands find the parts it made there: the local object
store (objectstore/store.json), the local Spark cluster (spark/cluster.json) and the local Flink session
cluster (flink/cluster.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOCAL_STORE_LAKEHOUSE = "s3a://eddy/lakehouse"  # `eddy up --object-store`: the bucket and prefix of the lake


def spark_cluster_record(home: Path) -> Path:
    return home / "spark" / "cluster.json"


def flink_cluster_record(home: Path) -> Path:
    return home / "flink" / "cluster.json"


def _store_record(home: Path) -> Path:
    return home / "objectstore" / "store.json"


def _recorded(path: Path, keys: set[str]) -> dict[str, str] | None:
    """A record `eddy up` wrote into the home, when it holds `keys`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and keys <= data.keys() else None


def write_record(path: Path, data: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def recorded_spark_cluster(home: Path) -> dict[str, str] | None:
    """The master and UI addresses of the local Spark cluster `eddy up --spark-cluster` made for this home."""
    return _recorded(spark_cluster_record(home), {"master", "ui"})


def recorded_flink_cluster(home: Path) -> dict[str, str] | None:
    """The JobManager's REST address of the Flink session cluster `eddy up --flink-cluster` made for this home."""
    return _recorded(flink_cluster_record(home), {"rest"})


def record_flink_cluster(home: Path, rest: str) -> None:
    write_record(flink_cluster_record(home), {"rest": rest})


def local_flink_flags(home: Path) -> dict[str, str]:
    """The flags of `eddy up --flink-cluster` (with the Flink engine): its session cluster at the address this
    home recorded, else on a free loopback port."""
    from deploy.processes import free_port

    recorded = recorded_flink_cluster(home)
    return {"flink_cluster": recorded["rest"] if recorded else f"127.0.0.1:{free_port()}"}


def recorded_store(home: Path) -> dict[str, str] | None:
    """The lakehouse and endpoint of the local object store `eddy up --object-store` made for this home."""
    return _recorded(_store_record(home), {"lakehouse", "endpoint"})


def record_store(home: Path, lakehouse: str, endpoint: str) -> None:
    """Remember this home's local object store, so later commands find the lake on it."""
    write_record(_store_record(home), {"lakehouse": lakehouse, "endpoint": endpoint})


def local_store_flags(home: Path) -> dict[str, str]:
    """The flags of `eddy up --object-store`: the lake on the local store, at the endpoint this home
    recorded, else on a free loopback port."""
    from deploy.processes import free_port

    recorded = recorded_store(home)
    endpoint = recorded["endpoint"] if recorded else f"http://127.0.0.1:{free_port()}"
    return {"lakehouse": LOCAL_STORE_LAKEHOUSE, "s3_endpoint": endpoint}


def distributed_flags(home: Path, brokers: int | None, engine: str, engine_workers: int) -> dict[str, Any]:
    """The flags of `--distributed` over what is already set: three brokers, the feature stage spread (two
    native workers, or the Flink job on a session cluster), the lake and the models on the local object
    store (its Spark cluster is the caller's to ask for)."""
    spread = (local_flink_flags(home) if engine == "flink"
              else {"engine_workers": engine_workers if engine_workers > 1 else 2})
    return {"brokers": brokers or 3, **spread, **local_store_flags(home)}
