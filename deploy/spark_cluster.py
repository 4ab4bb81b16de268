"""A local Spark standalone cluster (`eddy up --spark-cluster`): a master and a worker, each its own JVM
from the Spark that pyspark ships, on free loopback ports; they, and every application's driver and
executors, authenticate with this home's shared secret and encrypt what they send."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from deploy import security
from deploy.environment import child_environment
from deploy.home_records import recorded_spark_cluster, spark_cluster_record, write_record
from deploy.processes import ProcessTable, free_port
from deploy.settings import Settings

MASTER, WORKER = "spark-master", "spark-worker"
START_DEADLINE_S = 90.0
SECRET_NAME = "spark"  # the cluster's shared secret, kept with the home's other generated passwords


@dataclass(frozen=True)
class SparkClusterInfo:
    master: str          # spark://host:port
    ui: str              # the master's web UI
    start_s: float = 0.0
    pids: tuple[int, ...] = ()


def cluster_conf(settings: Settings) -> dict[str, str]:
    """The Spark settings an application needs to run on this home's local cluster (its shared secret),
    when EDDY_SPARK_MASTER names it; none otherwise."""
    recorded = recorded_spark_cluster(settings.home)
    if recorded is None or settings.spark_master != recorded["master"]:
        return {}
    # One core and a small executor per application: ingestion runs all the time, and a query or a
    # retrain beside it would otherwise wait for cores that ingestion holds.
    return {"spark.authenticate": "true", "spark.authenticate.secret": _secret(settings),
            "spark.pyspark.python": sys.executable, "spark.executor.memory": "768m", "spark.cores.max": "1"}


def _secret(settings: Settings) -> str:
    return security.passwords(settings.home, [SECRET_NAME])[SECRET_NAME]


def alive_workers(ui: str) -> int:
    """How many workers the master counts ALIVE (0 when it does not answer)."""
    try:
        with urllib.request.urlopen(f"{ui}/json/", timeout=3) as answer:
            state = json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError):
        return 0
    return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")


def ensure_spark_cluster(settings: Settings, table: ProcessTable, cores: int = 4, memory: str = "4g") -> SparkClusterInfo:
    """Start the master and one worker unless they run; returns the master's spark:// URL. The worker
    offers `cores` executor slots (more than this host's cores: ingestion, a query and a retrain each hold
    one at once, mostly waiting on I/O); its executors run this Python (spark.pyspark.python) and log
    under EDDY_HOME/spark/work."""
    recorded = recorded_spark_cluster(settings.home)
    master, worker = table.get(MASTER), table.get(WORKER)
    if recorded and master is not None and master.alive() and worker is not None and worker.alive():
        return SparkClusterInfo(recorded["master"], recorded["ui"], pids=(master.pid, worker.pid))
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    root = settings.home / "spark"
    (root / "work").mkdir(parents=True, exist_ok=True)
    properties = security.write_private(root / "cluster.properties", "".join(f"{k}={v}\n" for k, v in {
        "spark.authenticate": "true",
        "spark.authenticate.secret": _secret(settings),  # in a private file: never in argv or the pid record
        "spark.network.crypto.enabled": "true",
        "spark.worker.cleanup.enabled": "true",
    }.items()))
    env = child_environment(settings, {"SPARK_HOME": str(spark_home), "PYSPARK_PYTHON": sys.executable,
                                       "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_NO_DAEMONIZE": "1"})
    spark_class = str(spark_home / "bin" / "spark-class")
    port, ui_port = (free_port(), free_port()) if recorded is None else _ports(recorded)
    url, ui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}"
    pids = []
    took = 0.0
    if master is None or not master.alive():
        master = table.start(MASTER, [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                      "--port", str(port), "--webui-port", str(ui_port), "--properties-file",
                                      str(properties)], env, address=url)
    pids.append(master.pid)
    if worker is None or not worker.alive():
        worker = table.start(WORKER, [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                      "--cores", str(cores), "--memory", memory, "--work-dir", str(root / "work"),
                                      "--webui-port", str(free_port()), "--properties-file", str(properties), url],
                             env, address=url)
    pids.append(worker.pid)
    write_record(spark_cluster_record(settings.home), {"master": url, "ui": ui})
    took = table.wait_healthy(worker, lambda: alive_workers(ui) >= 1, START_DEADLINE_S, "the Spark worker")
    return SparkClusterInfo(url, ui, took, tuple(pids))


def _ports(recorded: dict[str, str]) -> tuple[int, int]:
    return int(recorded["master"].rsplit(":", 1)[1]), int(recorded["ui"].rsplit(":", 1)[1])
