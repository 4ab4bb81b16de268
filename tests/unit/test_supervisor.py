"""Supervision with real child processes (sleep, sh) and no service: a killed part comes back with
its restart counted and its exit recorded, the backoff grows, a crash loop is called one, and
stopping the supervisor stops its components."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from deploy.processes import ProcessTable
from deploy.supervisor import Policy, Supervisor, read_state
from features.waiting import wait_until

FAST = Policy(backoff_first_s=0.05, backoff_max_s=0.4, healthy_after_s=5.0, crash_loop_restarts=4,
              crash_loop_window_s=10.0)


@pytest.fixture
def table(tmp_path: Path) -> ProcessTable:
    return ProcessTable(tmp_path / "run", tmp_path / "logs")


def running(supervisor: Supervisor) -> threading.Thread:
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    return thread


def starter(table: ProcessTable, name: str, *argv: str):
    return lambda: table.start(name, list(argv), dict(os.environ))


def test_a_killed_part_comes_back_with_its_exit_recorded(table):
    supervisor = Supervisor(table, {"sleeper": starter(table, "sleeper", "sleep", "60")}, ["sleeper"], FAST, 0.02)
    thread = running(supervisor)
    try:
        first = wait_until(lambda: table.get("sleeper") and table.get("sleeper").alive() and table.get("sleeper"),
                           10, "the part to start")
        os.kill(first.pid, signal.SIGKILL)
        second = wait_until(lambda: (r := table.get("sleeper")) and r.alive() and r.pid != first.pid and r,
                            10, "the part to come back")
        assert second.pid != first.pid
        state = wait_until(lambda: read_state(table.run_dir).get("sleeper", {}).get("restarts") == 1
                           and read_state(table.run_dir)["sleeper"], 5, "the state file")
        assert state["last_exit_code"] == -signal.SIGKILL and state["last_reason"] == "killed by SIGKILL"
        assert state["state"] == "running" and not state["crash_looping"]
    finally:
        supervisor.stop()
        thread.join(30)
    assert not thread.is_alive() and table.get("sleeper") is None  # stopped with the supervisor


def test_a_part_that_keeps_failing_backs_off_and_is_called_crash_looping(table, caplog):
    script = "echo 'ERROR: cannot reach the broker' >&2; exit 3"
    supervisor = Supervisor(table, {"failing": starter(table, "failing", "sh", "-c", script)}, ["failing"], FAST, 0.01)
    caplog.set_level(logging.WARNING, logger="deploy.supervisor")
    thread = running(supervisor)
    try:
        state = wait_until(lambda: (s := read_state(table.run_dir).get("failing", {})).get("crash_looping") and s,
                           30, "the crash loop to be seen")
    finally:
        supervisor.stop()
        thread.join(30)
    assert state["last_exit_code"] == 3
    assert state["last_reason"] == "exited with status 3: ERROR: cannot reach the broker"
    assert state["restarts"] >= FAST.crash_loop_restarts - 1
    waits = [float(r.getMessage().rsplit("restarting in ", 1)[1].rstrip("s")) for r in caplog.records
             if "restarting in" in r.getMessage()]
    assert waits[:3] == [0.05, 0.1, 0.2]  # the backoff doubles
    assert sum("crash-looping" in r.getMessage() for r in caplog.records) == 1  # said once, not per restart


def test_backoff_starts_over_after_a_long_run():
    policy = Policy(backoff_first_s=1, backoff_max_s=30)
    assert [policy.backoff(n) for n in range(0, 8)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_a_part_running_before_the_supervisor_is_adopted_not_started_twice(table):
    table.start("early", ["sleep", "60"], dict(os.environ))
    before = table.get("early")
    starts = []
    supervisor = Supervisor(table, {"early": lambda: starts.append(1)}, ["early"], FAST, 0.02)
    thread = running(supervisor)
    try:
        time.sleep(0.3)
        assert starts == [] and table.get("early").pid == before.pid
    finally:
        supervisor.stop()
        thread.join(30)
    assert table.get("early") is None


def test_a_supervisor_whose_stack_is_gone_stops_its_children_and_leaves(table):
    mine = {"yes": True}
    supervisor = Supervisor(table, {"sleeper": starter(table, "sleeper", "sleep", "60")}, ["sleeper"], FAST, 0.02)
    thread = threading.Thread(target=supervisor.run, args=(lambda: mine["yes"],), daemon=True)
    thread.start()
    child = wait_until(lambda: (r := table.get("sleeper")) and r.alive() and r, 10, "the part to start")
    (table.run_dir / "sleeper.json").unlink()  # as when its EDDY_HOME was removed
    mine["yes"] = False
    thread.join(30)
    assert not thread.is_alive()
    assert wait_until(lambda: not os.path.exists(f"/proc/{child.pid}") or
                      open(f"/proc/{child.pid}/stat").read().split()[2] == "Z", 10, "the child to be stopped")


def test_the_scorers_scale_to_what_run_scorers_asks_and_the_others_are_left_alone(table):
    from deploy.supervisor import SCALE_FILE, Replicas, write_scale

    def replica(i: int):
        return starter(table, f"scorer-{i}", "sleep", "60")

    starters = {"engine": starter(table, "engine", "sleep", "60"), "scorer-0": replica(0)}
    supervisor = Supervisor(table, starters, ["engine", "scorer-0"], FAST, 0.02,
                            replicas=(Replicas(SCALE_FILE, lambda i: f"scorer-{i}", replica),))
    write_scale(table.run_dir, 1)
    thread = running(supervisor)

    def alive(*names: str) -> bool:
        return all((r := table.get(n)) is not None and r.alive() for n in names)

    try:
        wait_until(lambda: alive("engine", "scorer-0"), 10, "the parts to start")
        engine, first = table.get("engine").pid, table.get("scorer-0").pid
        write_scale(table.run_dir, 3)
        wait_until(lambda: alive("scorer-1", "scorer-2"), 10, "two more scorers")
        write_scale(table.run_dir, 1)
        wait_until(lambda: table.get("scorer-1") is None and table.get("scorer-2") is None, 30, "two scorers retired")
        state = wait_until(lambda: (s := read_state(table.run_dir)) and "scorer-1" not in s and s, 5, "the state file")
        assert sorted(state) == ["engine", "scorer-0"]  # a retired replica is no longer supervised
        assert (table.get("engine").pid, table.get("scorer-0").pid) == (engine, first)
        assert state["engine"]["restarts"] == state["scorer-0"]["restarts"] == 0
    finally:
        supervisor.stop()
        thread.join(30)
    assert table.get("engine") is None and table.get("scorer-0") is None


def test_a_held_part_is_left_stopped_and_the_one_started_by_its_holder_is_adopted(table):
    from deploy.supervisor import holding

    supervisor = Supervisor(table, {"sleeper": starter(table, "sleeper", "sleep", "60")}, ["sleeper"], FAST, 0.02)
    thread = running(supervisor)
    try:
        first = wait_until(lambda: (r := table.get("sleeper")) and r.alive() and r, 10, "the part to start")
        with holding(table.run_dir, "sleeper"):
            table.stop("sleeper")
            time.sleep(1.0)  # twenty backoffs: a supervisor not holding would have started it again
            assert table.get("sleeper") is None
            assert wait_until(lambda: read_state(table.run_dir).get("sleeper", {}).get("state") == "held", 5, "held")
            mine = table.start("sleeper", ["sleep", "60"], dict(os.environ))
        time.sleep(0.5)
        assert table.get("sleeper").pid == mine.pid != first.pid  # adopted, not started twice
        state = wait_until(lambda: read_state(table.run_dir)["sleeper"]["state"] == "running"
                           and read_state(table.run_dir)["sleeper"], 5, "adopted")
        assert state["restarts"] == 0
    finally:
        supervisor.stop()
        thread.join(30)
