"""The process table on real child processes: identity by pid and creation time, who holds a port, stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deploy.processes import ProcessTable, pid_matches, port_holder
from deploy.stack import _rss_mb
from features.errors import ServiceError

SLEEP = [sys.executable, "-c", "import time; print('on', flush=True); time.sleep(60)"]


@pytest.fixture
def table(tmp_path):
    table = ProcessTable(tmp_path / "run", tmp_path / "logs")
    yield table
    for record in table.all():
        table.stop(record.name, timeout_s=1)


def test_a_record_is_its_process_and_not_a_later_one_with_the_same_pid(table):
    record = table.start("sleeper", SLEEP, os.environ)
    assert record.alive() and table.get("sleeper") == record
    assert not pid_matches(record.pid, record.created + 60)  # a reused pid starts later
    table.wait_healthy(record, lambda: "on" in Path(record.log).read_text(), 10, "sleeper")
    assert _rss_mb(record.pid) > 5  # a Python interpreter
    assert table.stop("sleeper") and not record.alive() and table.get("sleeper") is None
    assert _rss_mb(record.pid) is None


def test_a_zombie_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        time.sleep(0.5)  # exited, not yet reaped
        assert not pid_matches(child.pid, None)
    finally:
        child.wait()


def test_stop_kills_the_group_of_a_process_that_ignores_sigterm(table):
    ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('on', flush=True); time.sleep(60)"
    record = table.start("stubborn", [sys.executable, "-c", ignores], os.environ)
    table.wait_healthy(record, lambda: "on" in Path(record.log).read_text(), 10, "stubborn")
    started = time.monotonic()
    assert table.stop("stubborn", timeout_s=0.5)
    assert not record.alive() and 0.5 <= time.monotonic() - started < 5


def test_wait_healthy_names_the_log_line_of_a_process_that_died(table):
    record = table.start("dies", [sys.executable, "-c", "raise SystemExit('Error: no config')"], os.environ)
    with pytest.raises(ServiceError, match=r"dies exited during start: Error: no config \(log: .*dies.log\)"):
        table.wait_healthy(record, lambda: False, 10, "dies")
    assert table.get("dies") is None


def test_port_holder_names_the_listening_process():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_holder(port) == f"pid {os.getpid()} ({psutil.Process().name()})"
    assert port_holder(port) == ""


def test_a_record_written_before_psutil_is_still_read_and_stopped(table):
    proc = subprocess.Popen(SLEEP, start_new_session=True)
    table.run_dir.mkdir(parents=True)
    (table.run_dir / "old.json").write_text(json.dumps({
        "name": "old", "pid": proc.pid, "argv": SLEEP, "log": os.devnull, "started_at": 0.0, "start_ticks": 1}))
    record = table.get("old")
    assert record is not None and record.created is None and record.alive()
    assert table.stop("old", timeout_s=5)
    assert proc.wait(5) == -15
