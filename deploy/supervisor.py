"""Supervision: one process per stack keeps every part it started alive.

`eddy up` starts the supervisor (`eddy run supervisor`); the supervisor starts each component of the
stack and restarts any that exits or is killed, after an exponential backoff (1 s doubling to 30 s,
reset once a part has run a minute). It brings back a local broker or Redis that `eddy up` started
too. Five restarts of one part within a minute mark it crash-looping: said once in the log and in
`eddy status`, and restarts go on at the longest backoff instead of spinning. Restarts, the last exit
code and its reason are kept in run/supervision.json, which `eddy status` reads. SIGTERM stops every
component (each SIGTERM then SIGKILL), then the supervisor.

A small loop of eddy's own rather than supervisord or circus: the parts are already recorded by pid
and creation time in run/ (so `eddy down` and `eddy status` find them with or without a supervisor),
health is each part's own heartbeat, and the broker and Redis come back through the same functions
that start them; a second daemon with its own configuration language would duplicate all of that."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy import broker, components, flink_cluster, object_store, redis_local, spark_cluster
from deploy.environment import child_environment
from deploy.processes import ProcessTable, Record, exit_status, last_error_line, stop_orphans
from deploy.settings import MAX_REPLICAS, Settings
from features.errors import EddyError
from streams.telemetry import StageMetrics

log = logging.getLogger(__name__)
NAME = "supervisor"
STATE_FILE = "supervision.json"
SCALE_FILE = "scorers"  # run/scorers: how many scorer replicas `eddy up --scorers N` wants of a running supervisor
WORKERS_FILE = "engine-workers"  # run/engine-workers: how many feature-stage workers `--engine-workers N` wants


@dataclass(frozen=True)
class Replicas:
    """A part that runs as replicas in one consumer group, scaled while the stack runs: run/<file> holds how
    many, replica i is named name(i) and started by start(i)."""

    file: str
    name: Callable[[int], str]
    start: Callable[[int], Callable[[], Any]]
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 30.0
HEALTHY_AFTER_S = 60.0         # a part that ran this long starts its backoff over
CRASH_LOOP_RESTARTS, CRASH_LOOP_WINDOW_S = 5, 60.0
TICK_S = 0.25


@dataclass
class PartState:
    """What supervision knows of one part; what `eddy status` shows as restarts and last exit."""

    restarts: int = 0
    state: str = "starting"              # running | backoff | crash-looping | stopped
    last_exit_code: int | None = None
    last_reason: str | None = None
    last_exit_at: float | None = None
    started_at: float | None = None
    next_start_at: float = 0.0
    failures: int = 0                    # consecutive short runs: the backoff's exponent
    recent: deque = field(default_factory=deque)  # the latest restart times, up to the crash-loop count

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        for private in ("recent", "next_start_at", "failures"):
            data.pop(private)
        return data


def read_state(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The supervisor's last written view of each part ({} when none ran)."""
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class Policy:
    """How supervision backs off and when it calls a part crash-looping."""

    backoff_first_s: float = BACKOFF_FIRST_S
    backoff_max_s: float = BACKOFF_MAX_S
    healthy_after_s: float = HEALTHY_AFTER_S
    crash_loop_restarts: int = CRASH_LOOP_RESTARTS
    crash_loop_window_s: float = CRASH_LOOP_WINDOW_S

    def backoff(self, failures: int) -> float:
        """The wait before the next start after `failures` short runs in a row (none after a long one)."""
        return min(self.backoff_max_s, self.backoff_first_s * 2 ** (failures - 1)) if failures > 0 else 0.0


class Supervisor:
    """Keeps parts running; run() until stop() (or SIGTERM in its own process).

    `starters` maps each part's name to what starts it (the function records the process in
    `table`); `components` names the parts it also stops when it stops (not the broker or Redis)."""

    def __init__(self, table: ProcessTable, starters: dict[str, Callable[[], Any]], components: list[str],
                 policy: Policy = Policy(), tick_s: float = TICK_S,
                 replicas: tuple[Replicas, ...] = ()) -> None:
        self.table = table
        self.starters = starters
        self.wanted = components
        self.replicas = replicas  # the parts the stack scales (scorers, feature-stage workers)
        self.policy = policy
        self.tick_s = tick_s
        self.parts = {name: PartState(recent=deque(maxlen=policy.crash_loop_restarts)) for name in starters}
        self.services = [name for name in starters if name not in components]
        self._stop = threading.Event()
        self._still_mine: Callable[[], bool] = lambda: True  # run()'s
        self.metrics: StageMetrics | None = None

    def stop(self) -> None:
        self._stop.set()

    def run(self, still_mine: Callable[[], bool] = lambda: True) -> None:
        """Watch and restart until stopped, or until still_mine() says this supervisor is no longer
        the stack's (its record replaced or removed, its EDDY_HOME gone); then stop every component."""
        log.info("supervising %s", ", ".join(self.parts))
        self._still_mine = still_mine
        try:
            while not self._stop.is_set():
                if not still_mine():
                    log.error("this supervisor is no longer the stack's (its record under %s is gone or names "
                              "another process): stopping its components and leaving", self.table.run_dir)
                    break
                self._rescale()
                for name in self.parts:
                    self._check(name)
                self._write()
                self._stop.wait(self.tick_s)
        finally:
            self._stop_components()

    def _rescale(self) -> None:
        """Start or retire replicas until each scaled part has as many as its run/ file asks for: the new
        ones join the part's consumer group, a retired one is stopped (SIGTERM: it leaves the group after
        its batch) and no longer supervised."""
        for group in self.replicas:
            wanted = read_scale(self.table.run_dir, group.file)
            if wanted is None:
                continue
            have = [n for n in map(group.name, range(MAX_REPLICAS)) if n in self.wanted]
            for i in range(len(have), wanted):
                name = group.name(i)
                log.info("scaling to %d: starting %s", wanted, name)
                self.starters[name] = group.start(i)
                self.parts[name] = PartState(recent=deque(maxlen=self.policy.crash_loop_restarts))
                self.wanted.append(name)
            for name in have[wanted:]:
                log.info("scaling to %d: stopping %s", wanted, name)
                self.wanted.remove(name)
                del self.starters[name], self.parts[name]
                self.table.stop(name)

    def _check(self, name: str) -> None:
        part, record = self.parts[name], self.table.get(name)
        now = time.time()
        if record is not None and record.alive():
            if part.state != "running" and part.started_at is None:
                part.state, part.started_at = "running", record.started_at  # found running: adopt it
            return
        if held(self.table.run_dir, name):  # another process stopped it and will start it: neither twice
            part.state, part.started_at = "held", None
            return
        if part.state == "running" or (record is not None and part.started_at is not None):
            self._exited(name, part, record, now)
        # `eddy down` forgets this supervisor's record before it stops the rest: asked again right before a
        # start, so that a supervisor being retired brings back nothing down has just stopped
        if now >= part.next_start_at and self._still_mine():
            self._start(name, part, now)

    def _exited(self, name: str, part: PartState, record: Record | None, now: float) -> None:
        code, reason = (None, "gone") if record is None else exit_status(record)
        if record is not None:
            if code is not None and code > 0:
                reason = f"{reason}: {last_error_line(Path(record.log))}"
            self.table.forget(name)
        policy = self.policy
        ran = now - (part.started_at or now)
        part.failures = 0 if ran >= policy.healthy_after_s else part.failures + 1
        part.last_exit_code, part.last_reason, part.last_exit_at = code, reason, now
        part.started_at = None
        delay = policy.backoff(part.failures)
        part.recent.append(now)
        looping = (len(part.recent) == policy.crash_loop_restarts
                   and now - part.recent[0] <= policy.crash_loop_window_s)
        if looping:
            delay = policy.backoff_max_s
            if part.state != "crash-looping":
                log.error("%s is crash-looping: %d restarts within %.0fs; last exit: %s; retrying every %.3gs",
                          name, policy.crash_loop_restarts, policy.crash_loop_window_s, reason, delay)
        else:
            log.warning("%s exited (%s); restarting in %.3gs", name, reason, delay)
        part.state = "crash-looping" if looping else "backoff"
        part.next_start_at = now + delay

    def _start(self, name: str, part: PartState, now: float) -> None:
        first = part.started_at is None and part.last_exit_at is None
        try:
            self.starters[name]()
        except EddyError as exc:  # a service that cannot start yet (a port held, a deadline passed)
            part.failures += 1
            part.last_reason = str(exc)
            part.next_start_at = now + self.policy.backoff(part.failures)
            log.warning("%s could not start (%s); trying again in %.3gs", name, exc, part.next_start_at - now)
            return
        if not first:
            part.restarts += 1
            log.info("%s restarted (restart %d)", name, part.restarts)
        part.started_at = time.time()
        if part.state != "crash-looping":
            part.state = "running"

    def _export(self) -> None:
        """Restarts and crash loops into the metrics, per stage (replicas summed)."""
        if self.metrics is None:
            return
        restarts: dict[str, int] = {}
        looping: dict[str, bool] = {}
        for name, part in self.parts.items():
            stage = stage_of(name)
            restarts[stage] = restarts.get(stage, 0) + part.restarts
            looping[stage] = looping.get(stage, False) or part.state == "crash-looping"
        pipeline = self.metrics.pipeline
        for stage, n in restarts.items():
            self.metrics.total(self.metrics.family("eddy_stage_restarts_total").labels(pipeline, stage), n)
            self.metrics.family("eddy_stage_crash_looping").labels(pipeline, stage).set(int(looping[stage]))

    def _write(self) -> None:
        self._export()
        path = self.table.run_dir / STATE_FILE
        data = {name: {**part.public(), "crash_looping": part.state == "crash-looping"}
                for name, part in self.parts.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def _stop_components(self) -> None:
        """Stop the components (not the broker or Redis: `eddy down` stops those last), in parallel,
        and any other child this process started whose record is gone."""
        threads = [threading.Thread(target=self.table.stop, args=(name,)) for name in self.wanted]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop_orphans(keep={r.pid for r in self.table.all() if r.name in self.services})
        for name in self.wanted:
            self.parts[name].state = "stopped"
        if self.table.run_dir.exists():
            self._write()


def stack_supervisor(settings: Settings, table: ProcessTable) -> Supervisor:
    """The supervisor of one stack: its components, and the broker and Redis when `eddy up` started
    them locally (they come back through the functions that start them)."""
    env = child_environment(settings)
    wanted = [c.name for c in components.wanted(settings)]
    starters: dict[str, Callable[[], Any]] = {}
    for record in table.all():  # each local broker comes back through the start of all that are down
        if broker.is_node(record.name):
            starters[record.name] = lambda: broker.ensure_broker(settings, table)
    if table.get(redis_local.NAME) is not None:
        starters[redis_local.NAME] = lambda: redis_local.ensure_redis(settings, table)
    if table.get(object_store.NAME) is not None:
        starters[object_store.NAME] = lambda: object_store.ensure_object_store(settings, table)
    for name in (spark_cluster.MASTER, spark_cluster.WORKER):
        if table.get(name) is not None:
            starters[name] = lambda: spark_cluster.ensure_spark_cluster(settings, table)

    for record in table.all():  # the Flink session cluster: a JobManager keeps its address, TaskManagers re-register
        if record.name == flink_cluster.JOBMANAGER or record.name.startswith(flink_cluster.TASKMANAGER):
            starters[record.name] = lambda: flink_cluster.ensure_cluster(settings, table)

    def component(name: str) -> Callable[[], Any]:
        return functools.partial(table.start, name, components.argv(name), components.environment(settings, name, env))

    for name in wanted:
        starters[name] = component(name)
    groups = [Replicas(WORKERS_FILE, functools.partial(components.worker_name, components.stage_name(settings)),
                       lambda i: component(components.worker_name(components.stage_name(settings), i)))]
    if not settings.fused:
        groups.append(Replicas(SCALE_FILE, components.scorer_name, lambda i: component(components.scorer_name(i))))
    return Supervisor(table, starters, wanted, replicas=tuple(groups))


def hold_file(run_dir: Path, name: str) -> Path:
    return run_dir / "held" / name


def held(run_dir: Path, name: str) -> bool:
    """Whether a part is held: stopped on purpose by another process of eddy (a bench timing a restart),
    which starts it again itself; the supervisor neither restarts it nor counts its exit meanwhile."""
    return hold_file(run_dir, name).exists()


@contextmanager
def holding(run_dir: Path, name: str) -> Iterator[None]:
    """Hold `name` for the length of the block (see held)."""
    path = hold_file(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def read_scale(run_dir: Path, file: str = SCALE_FILE) -> int | None:
    """The replicas run/<file> asks for (None: no such file, or not a count)."""
    try:
        return max(1, int((run_dir / file).read_text()))
    except (OSError, ValueError):
        return None


def write_scale(run_dir: Path, count: int, file: str = SCALE_FILE) -> None:
    """Ask the stack's supervisor for `count` replicas of the part run/<file> scales (read every tick)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{file}.tmp"
    tmp.write_text(str(count))
    os.replace(tmp, run_dir / file)


def run_supervisor(settings: Settings) -> None:
    """`eddy run supervisor`: supervise this EDDY_HOME's stack until SIGTERM."""
    from deploy.components import serve_metrics
    from features.spec import load_spec

    table = ProcessTable(settings.run_dir, settings.logs_dir)
    supervisor = stack_supervisor(settings, table)
    supervisor.metrics = serve_metrics(settings, load_spec(settings.pipeline), NAME, NAME)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stop())

    def still_mine() -> bool:
        record = table.get(NAME)
        return record is not None and record.pid == os.getpid()

    supervisor.run(still_mine)


def stage_of(part: str) -> str:
    """The stage a part runs: scorer-2 -> scorer, features-native -> features."""
    return part.split("-")[0] if part.startswith(("features-", "scorer-")) else part
