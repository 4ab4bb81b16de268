"""Helpers for tests that run a whole private stack with `eddy up`."""

from __future__ import annotations

import json
import time

from tests.conftest import run_eddy


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def status(env: dict[str, str]) -> dict:
    return json.loads(run_eddy(["status", "--json"], env).stdout)


def group_lag(env: dict[str, str], group: str, topic: str) -> int | None:
    return status(env).get("lag", {}).get(group, {}).get(topic)
