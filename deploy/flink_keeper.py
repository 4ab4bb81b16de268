"""The Flink engine's stage when the job runs on a session cluster (`eddy up --engine flink --flink-cluster`).

The part `features-flink` is then a small process that keeps the job running rather than running it:

- it adopts the job of this pipeline that already runs on the cluster (its name is the stage id), so a
  keeper restarted by supervision never submits a second one;
- when none runs (first start, or a JobManager that came back empty: a standalone JobManager keeps no
  jobs across a restart), it submits the job with `flink run`, from the newest checkpoint the last job
  completed (retained in the checkpoint storage), so state and source offsets resume where they were;
- it records the job's id in run/flink-job.json, where a restarted keeper finds whose checkpoints to resume;
- it beats the stage's heartbeat while the job and every task of it run, so `eddy up` and `eddy status`
  call the stage up only then (the job's functions beat from the TaskManagers as well, with their counts);
- on SIGTERM it cancels the job (its checkpoints are retained on cancellation), so a stack restarted with
  other settings never has two jobs writing features.

A TaskManager that dies is brought back by the supervisor; Flink itself restarts the job from its last
checkpoint once the slots are back (its restart strategy), with no submit from here."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deploy import flink_cluster
from deploy.settings import Settings
from features.errors import ServiceError
from features.spec import PipelineSpec
from streams.guards import Backoff

log = logging.getLogger("eddy.flink.keeper")
JOB_FILE = "flink-job.json"
# States of a job that still runs or will run again; a job in any other is gone (FINISHED, FAILED, CANCELED).
LIVE_STATES = frozenset({"INITIALIZING", "CREATED", "RUNNING", "RESTARTING", "FAILING", "RECONCILING", "SUSPENDED"})
TICK_S = 1.0


def job_file(settings: Settings) -> Path:
    return settings.run_dir / JOB_FILE


def read_job(settings: Settings) -> dict[str, Any]:
    """What the keeper last recorded: {"job": the job's id, "restored_from": the checkpoint it started from
    or None}, or {}."""
    try:
        data = json.loads(job_file(settings).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(settings: Settings, data: dict[str, Any]) -> None:
    path = job_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def live_job(rest: flink_cluster.Rest, name: str) -> str | None:
    """The id of the newest job called `name` that runs or will run again on the cluster, or None."""
    jobs = [j for j in rest.get("/jobs/overview")["jobs"] if j.get("name") == name and j.get("state") in LIVE_STATES]
    return max(jobs, key=lambda j: j.get("start-time", 0))["jid"] if jobs else None


def _filesystem(settings: Settings, uri: str) -> tuple[Any, str] | None:
    """(a pyarrow file system, the path in it) for a checkpoint URI: a local folder or the object store."""
    from pyarrow import fs

    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        return fs.LocalFileSystem(), parts.path
    store = settings.object_store
    if parts.scheme in ("s3", "s3a") and store is not None:
        return store.filesystem(), f"{parts.netloc}{parts.path}"
    return None


def latest_checkpoint(settings: Settings, job: str) -> str | None:
    """The newest complete checkpoint (a chk-N holding _metadata) a job left in the checkpoint storage.

    A resubmitted job must start from the newest one: a checkpoint's Kafka transactions commit once it
    completes, so starting from an older one would produce the records between the two a second time."""
    from pyarrow import fs

    root = settings.flink_checkpoint_uri.rstrip("/")
    found = _filesystem(settings, root)
    if found is None:
        return None
    system, path = found
    try:
        entries = system.get_file_info(fs.FileSelector(f"{path}/{job}", allow_not_found=True))
        numbered = sorted((int(e.base_name.removeprefix("chk-")), e.base_name) for e in entries
                          if e.type == fs.FileType.Directory and e.base_name.removeprefix("chk-").isdigit())
        for _, name in reversed(numbered):
            if system.get_file_info(f"{path}/{job}/{name}/_metadata").type == fs.FileType.File:
                return f"{root}/{job}/{name}"
    except OSError as exc:
        log.warning("could not list the checkpoints of job %s under %s: %s", job, root, exc)
    return None


def checkpoint_exists(settings: Settings, uri: str) -> bool:
    """Whether a retained checkpoint's _metadata is still there."""
    from pyarrow import fs

    found = _filesystem(settings, uri.rstrip("/"))
    if found is None:
        return False
    system, path = found
    try:
        return bool(system.get_file_info(f"{path}/_metadata").type == fs.FileType.File)
    except OSError:
        return False


class JobKeeper:
    """Keeps this pipeline's feature job running on the session cluster settings.flink_cluster names."""

    def __init__(self, settings: Settings, spec: PipelineSpec, name: str) -> None:
        import redis

        from streams.metrics import Heartbeat

        self.settings, self.spec, self.name = settings, spec, name
        self.rest = flink_cluster.rest(settings)
        self.heartbeat = Heartbeat(redis.Redis.from_url(settings.redis_url), spec.name, "features")
        self.heartbeat.field = f"{socket.gethostname()}:{os.getpid()}/keeper"
        self.job: str | None = None
        self.submits = 0
        self._faults = Backoff(log, first_s=0.5, most_s=5.0)

    def tick(self) -> None:
        """Adopt or submit the job (recording its id when it is new to this home), beat while it runs."""
        job = live_job(self.rest, self.name)
        if job is None:
            job = self._submit()
        elif job != self.job:
            log.info("keeping job %s (already on the cluster)", job)
            if read_job(self.settings).get("job") != job:
                _record(self.settings, {**read_job(self.settings), "job": job})
        self.job = job
        if self.rest.running(job):
            latest = (self.rest.checkpoints(job).get("latest") or {}).get("completed") or {}
            self.heartbeat.beat(0, engine="flink", keeper=True, job=job, submits=self.submits,
                                checkpoint_id=latest.get("id"))

    def _submit(self) -> str:
        """Submit the job, from the newest checkpoint the last job left (or the one that job started from,
        when it completed none)."""
        recorded = read_job(self.settings)
        restore = latest_checkpoint(self.settings, recorded["job"]) if recorded.get("job") else None
        if restore is None and (restore := recorded.get("restored_from")) and not checkpoint_exists(self.settings, restore):
            log.warning("the job's last checkpoint %s is gone: starting from the group's committed offsets "
                        "with empty state", restore)
            restore = None
        started = time.monotonic()
        job = flink_cluster.submit_job(self.settings, restore=restore)
        _record(self.settings, {"job": job, "restored_from": restore})
        self.submits += 1
        log.info("submitted job %s%s in %.1fs", job, f" from checkpoint {restore}" if restore else "",
                 time.monotonic() - started)
        return job

    def run(self, stop: threading.Event) -> None:
        """tick() about once a second until `stop`; a cluster that does not answer (a JobManager coming
        back) is waited out with backoff. Then the job is cancelled."""
        while not stop.is_set():
            try:
                self.tick()
                self._faults.cleared()
            except (OSError, ServiceError, KeyError, ValueError) as exc:
                self._faults.waiting(f"the Flink cluster at {self.rest.url}: {exc}")
                continue
            stop.wait(TICK_S)
        self.cancel()

    def cancel(self) -> None:
        """Cancel the job this keeper runs (its checkpoints stay: RETAIN_ON_CANCELLATION)."""
        if self.job is None:
            return
        try:
            self.rest.cancel(self.job)
            log.info("cancelled job %s", self.job)
        except OSError as exc:
            log.warning("could not cancel job %s: %s", self.job, exc)


def keep_job(settings: Settings, spec: PipelineSpec, name: str) -> None:
    """`eddy run features-flink` on a session cluster: keep the job until SIGTERM."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    JobKeeper(settings, spec, name).run(stop)
