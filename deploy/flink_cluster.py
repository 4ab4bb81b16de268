"""A standalone Flink session cluster on this host, and eddy's feature job on it.

The JobManager and each TaskManager run as processes of their own from the Flink distribution PyFlink
ships (its bin/ scripts in the foreground, so that they are the processes eddy records and stops), each
with a config folder of its own under EDDY_HOME/flink/<name>/ and its output in logs/<name>.log. The
cluster's configuration supplies what the job takes from a cluster (flink_job.flink_configuration):
parallelism, the RocksDB state backend, checkpoint storage (settings.flink_checkpoint_uri), a restart
strategy that waits for a replacement TaskManager, and the Python that runs the job's functions."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.environment import child_environment
from deploy.processes import ProcessTable, Record, free_port, is_loopback, port_holder, port_open
from deploy.security import write_private
from deploy.settings import REPO_ROOT, Settings
from features.errors import ConfigError, ServiceError
from features.waiting import poll

JOBMANAGER = "flink-jobmanager"
TASKMANAGER = "flink-taskmanager"
# Sized for a 2-core / 24 GiB machine that also runs the broker, Redis and the other stages. Each
# TaskManager has one slot: its job functions run in a CPython embedded in its JVM (thread mode), so
# two slots of one TaskManager would share one GIL.
MEMORY = {"jobmanager.memory.process.size": "768m", "taskmanager.memory.process.size": "1g",
          "taskmanager.memory.managed.size": "128m",  # RocksDB's; thread-mode Python takes none
          "taskmanager.memory.network.min": "64m", "taskmanager.memory.network.max": "64m"}
# A TaskManager that stops answering is declared lost after about two heartbeats: its slots are
# released and the job restarts on the TaskManagers left (or a replacement) sooner than Flink's 50 s.
LIVENESS = {"heartbeat.interval": "2000", "heartbeat.timeout": "10000"}
RESTART = {"restart-strategy.type": "exponential-delay",
           "restart-strategy.exponential-delay.initial-backoff": "1 s",
           "restart-strategy.exponential-delay.max-backoff": "10 s"}
START_DEADLINE_S = 90.0
SUBMIT_DEADLINE_S = 180.0
# What the job's Python needs besides the site-packages: eddy's packages, zipped for --pyFiles.
PACKAGES = ("streams", "features", "deploy", "models", "lakehouse")


def flink_home() -> Path:
    """The Flink distribution inside the installed PyFlink (bin/, lib/, opt/, conf/)."""
    spec = importlib.util.find_spec("pyflink")
    if spec is None or spec.origin is None:
        raise ServiceError("PyFlink is not installed: run `make setup`")
    return Path(spec.origin).parent


@dataclass(frozen=True)
class Rest:
    """The JobManager's REST API."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def get(self, path: str, timeout_s: float = 5.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as answer:
            return json.loads(answer.read())

    def patch(self, path: str, timeout_s: float = 10.0) -> None:
        request = urllib.request.Request(self.url + path, method="PATCH")
        with urllib.request.urlopen(request, timeout=timeout_s):
            return

    def answers(self) -> bool:
        try:
            self.get("/overview", timeout_s=1.0)
            return True
        except OSError:
            return False

    def taskmanagers(self) -> list[dict[str, Any]]:
        """The TaskManagers registered now (a killed one stays until its heartbeat times out)."""
        return list(self.get("/taskmanagers")["taskmanagers"])

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's state and its vertices' (GET /jobs/<id>)."""
        return dict(self.get(f"/jobs/{job_id}"))

    def checkpoints(self, job_id: str) -> dict[str, Any]:
        """The job's checkpoint counts, the latest completed and the latest restored (or None)."""
        return dict(self.get(f"/jobs/{job_id}/checkpoints"))

    def running(self, job_id: str) -> bool:
        """True when the job runs and every task of it runs or has finished (the one-row tick source)."""
        job = self.job(job_id)
        return job["state"] == "RUNNING" and all(
            v["tasks"].get("RUNNING", 0) + v["tasks"].get("FINISHED", 0) == v["parallelism"]
            for v in job["vertices"])

    def cancel(self, job_id: str) -> None:
        self.patch(f"/jobs/{job_id}?mode=cancel")


def rest(settings: Settings) -> Rest:
    """The cluster settings.flink_cluster names; ConfigError when it names none."""
    host, _, port = settings.flink_cluster.rpartition(":")
    if not host:
        raise ConfigError("EDDY_FLINK_CLUSTER is not set: set it to the JobManager's REST host:port, "
                          "like 127.0.0.1:8081")
    return Rest(host, int(port))


def parallelism(settings: Settings) -> int:
    return settings.flink_parallelism or settings.flink_taskmanagers


def taskmanager_name(index: int) -> str:
    return f"{TASKMANAGER}-{index}"


def node_dir(settings: Settings, name: str) -> Path:
    return settings.home / "flink" / name


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config.yaml as Flink's dotted keys."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def cluster_config(settings: Settings, rpc_port: int) -> dict[str, str]:
    """The cluster's config.yaml as dotted keys: the distribution's own (its JVM options) with eddy's
    addresses, memory, state backend, checkpoints, restart strategy and Python over it."""
    shipped = yaml.safe_load((flink_home() / "conf" / "config.yaml").read_text()) or {}
    address = rest(settings)
    python = sys.executable
    return {
        **_flat(shipped),
        "jobmanager.rpc.address": address.host, "jobmanager.rpc.port": str(rpc_port),
        "jobmanager.bind-host": address.host,
        "rest.address": address.host, "rest.bind-address": address.host, "rest.port": str(address.port),
        "taskmanager.host": address.host, "taskmanager.bind-host": address.host,
        "taskmanager.numberOfTaskSlots": "1",
        "parallelism.default": str(parallelism(settings)),
        "state.backend.type": "rocksdb",
        "execution.checkpointing.dir": settings.flink_checkpoint_uri,
        **_s3(settings), **MEMORY, **LIVENESS, **RESTART,
        # The job's functions run in this virtualenv's Python, embedded in the TaskManager's JVM, which
        # knows nothing of the virtualenv: its site-packages named (pemja, the job's dependencies).
        "python.executable": python, "python.client.executable": python,
        "python.pythonpath": sysconfig.get_paths()["purelib"],
    }


def _s3(settings: Settings) -> dict[str, str]:
    """The S3 file system's settings for s3:// checkpoints on the lakehouse's store (none otherwise)."""
    store = settings.object_store
    if store is None or not settings.flink_checkpoint_uri.startswith(("s3://", "s3a://")):
        return {}
    conf = {"s3.path.style.access": "true", "s3.endpoint.region": store.region}
    if store.endpoint:
        conf["s3.endpoint"] = store.endpoint
    if store.access_key:  # config.yaml is written private; no key goes into a command line
        conf |= {"s3.access-key": store.access_key, "s3.secret-key": store.secret_key}
    return conf


def plugins_dir(settings: Settings) -> Path:
    """The cluster's plugins/: the S3 file system (flink-s3-fs-hadoop, fetched by `make setup`), each
    plugin in a folder of its own as Flink loads them, as links."""
    plugins = settings.home / "flink" / "plugins"
    for jar in (settings.jars_dir / "flink-plugins").glob("flink-s3-fs-hadoop-*.jar"):
        folder = plugins / "s3-fs-hadoop"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / jar.name).exists():
            (folder / jar.name).symlink_to(jar)
    plugins.mkdir(parents=True, exist_ok=True)
    return plugins


def _write_conf(settings: Settings, name: str, config: dict[str, str]) -> Path:
    """A config folder for one process: the distribution's log settings and this config.yaml."""
    conf = node_dir(settings, name) / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    for shipped in (flink_home() / "conf").iterdir():
        if shipped.name != "config.yaml":
            shutil.copy(shipped, conf / shipped.name)
    write_private(conf / "config.yaml", yaml.safe_dump(config, sort_keys=True))  # it may hold the store's keys
    return conf


def _read_conf(settings: Settings, name: str) -> dict[str, str]:
    return dict(yaml.safe_load((node_dir(settings, name) / "conf" / "config.yaml").read_text()))


def lib_dir(settings: Settings) -> Path:
    """The cluster's lib/: the distribution's, with flink-python from its opt/ (the Python operators
    the JobManager deserializes and the TaskManagers run), as links."""
    lib = settings.home / "flink" / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    dist = flink_home()
    for jar in [*(dist / "lib").glob("*.jar"), *(dist / "opt").glob("flink-python-*.jar")]:
        link = lib / jar.name
        if not link.exists():
            link.symlink_to(jar)
    return lib


def _start(settings: Settings, table: ProcessTable, name: str, script: str, conf: Path) -> Record:
    """bin/<script> start-foreground with its config folder: it execs the JVM, so the process recorded
    is the JobManager or TaskManager itself, recorded at the cluster's REST address (where `eddy status`
    says it runs, as a Spark worker is recorded at its master's)."""
    home = node_dir(settings, name)
    env = child_environment(settings, {"FLINK_CONF_DIR": str(conf), "FLINK_LOG_DIR": str(home / "log"),
                                       "FLINK_PID_DIR": str(home), "FLINK_LIB_DIR": str(lib_dir(settings)),
                                       "FLINK_PLUGINS_DIR": str(plugins_dir(settings))})
    return table.start(name, [str(flink_home() / "bin" / script), "start-foreground"], env, cwd=home,
                       address=settings.flink_cluster)


def start_jobmanager(settings: Settings, table: ProcessTable) -> float:
    """Start the JobManager at settings.flink_cluster (a free loopback port); seconds until REST answers."""
    address = rest(settings)
    if not is_loopback(address.host):
        raise ConfigError(f"EDDY_FLINK_CLUSTER {settings.flink_cluster!r}: eddy starts a Flink cluster on a "
                          "loopback address only; a remote one is started by its own deployment")
    if port_open(address.host, address.port):
        holder = port_holder(address.port) or "another process"
        raise ServiceError(f"{settings.flink_cluster} is held by {holder}: stop it, or set EDDY_FLINK_CLUSTER "
                           "to a free port")
    conf = _write_conf(settings, JOBMANAGER, cluster_config(settings, _rpc_port(settings, address.host)))
    record = _start(settings, table, JOBMANAGER, "jobmanager.sh", conf)
    return table.wait_healthy(record, address.answers, START_DEADLINE_S, "the Flink JobManager")


def _rpc_port(settings: Settings, host: str) -> int:
    """The JobManager's RPC port: the one it had before when that is free (its TaskManagers reconnect to it
    after a restart), else a free one."""
    try:
        port = int(_read_conf(settings, JOBMANAGER)["jobmanager.rpc.port"])
    except (OSError, KeyError, ValueError, TypeError):
        return free_port()
    return free_port() if port_open(host, port) else port


def start_taskmanager(settings: Settings, table: ProcessTable, index: int) -> Record:
    """Start TaskManager `index` (again, as a replacement, when it died), with the JobManager's config
    and temporary folders of its own (RocksDB's files among them); it registers by itself."""
    name = taskmanager_name(index)
    tmp = node_dir(settings, name) / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a dead TaskManager's local state is never read again
    tmp.mkdir(parents=True)
    conf = _write_conf(settings, name, {**_read_conf(settings, JOBMANAGER), "io.tmp.dirs": str(tmp)})
    return _start(settings, table, name, "taskmanager.sh", conf)


def ensure_cluster(settings: Settings, table: ProcessTable) -> float:
    """The session cluster running with settings.flink_taskmanagers TaskManagers registered, starting the
    parts that do not run; seconds it took."""
    took = 0.0
    jobmanager = table.get(JOBMANAGER)
    if jobmanager is None or not jobmanager.alive():
        took = start_jobmanager(settings, table)
    address = rest(settings)
    started = [start_taskmanager(settings, table, i) for i in range(1, settings.flink_taskmanagers + 1)
               if not ((record := table.get(taskmanager_name(i))) and record.alive())]

    def registered() -> bool:
        for record in started:
            if not record.alive():
                raise ServiceError(f"{record.name} exited during start (log: {record.log})")
        return len(address.taskmanagers()) >= settings.flink_taskmanagers

    if not poll(registered, START_DEADLINE_S):
        raise ServiceError(f"the Flink TaskManagers did not register within {START_DEADLINE_S:.0f}s "
                           f"(logs: {table.logs_dir}/{TASKMANAGER}-*.log)")
    return took


def stop_cluster(settings: Settings, table: ProcessTable) -> None:
    """Stop the TaskManagers, then the JobManager (a running job is left to restore from its checkpoints)."""
    for record in table.all():
        if record.name.startswith(TASKMANAGER):
            table.stop(record.name)
    table.stop(JOBMANAGER)


def package(settings: Settings) -> Path:
    """eddy's packages zipped for --pyFiles (the job's client and its TaskManagers import them from it)."""
    path = settings.home / "flink" / "eddy.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in PACKAGES:
            for source in sorted((REPO_ROOT / name).rglob("*.py")):
                archive.write(source, source.relative_to(REPO_ROOT))
    return path


def submit_job(settings: Settings, extra_env: dict[str, str] | None = None, restore: str | None = None) -> str:
    """Submit eddy's feature job (deploy.flink_main) to the cluster, detached, with `flink run` as a user
    would; returns its job id. extra_env: variables for the job (the role it signs in as); restore: a
    retained checkpoint (or savepoint) to start from, its state and source offsets."""
    conf = node_dir(settings, JOBMANAGER) / "conf"
    if not (conf / "config.yaml").is_file():  # a cluster eddy did not start: the client needs its address only
        address = rest(settings)
        conf = _write_conf(settings, "client", {"rest.address": address.host, "rest.port": str(address.port),
                                                "jobmanager.rpc.address": address.host})
    client = node_dir(settings, "client")
    env = child_environment(settings, {"EDDY_PIPELINE": str(settings.pipeline.resolve()),  # the client runs elsewhere
                                       **(extra_env or {}), "FLINK_CONF_DIR": str(conf),
                                       "FLINK_LOG_DIR": str(client / "log")})
    argv = [str(flink_home() / "bin" / "flink"), "run", "--detached", "--parallelism", str(parallelism(settings)),
            *(["--fromSavepoint", restore] if restore else []),
            "--pyModule", "deploy.flink_main", "--pyFiles", str(package(settings))]
    client.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(argv, env=env, cwd=client, capture_output=True, text=True, timeout=SUBMIT_DEADLINE_S)
    found = re.search(r"JobID ([0-9a-f]{32})", done.stdout)
    if done.returncode != 0 or found is None:
        raise ServiceError(f"flink run failed ({done.returncode}): {done.stdout[-3000:]}")
    return found.group(1)
