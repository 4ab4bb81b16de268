"""Helpers for tests that run a whole private stack with `eddy up`."""

from __future__ import annotations

import json
from pathlib import Path

from features.waiting import TimedOut, wait_until
from tests.conftest import run_eddy


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.5):
    """wait_until for tests: a timeout fails the test with an AssertionError naming what was awaited."""
    try:
        return wait_until(predicate, timeout_s, what, every_s)
    except TimedOut as exc:
        raise AssertionError(str(exc)) from None


def status(env: dict[str, str]) -> dict:
    return json.loads(run_eddy(["status", "--json"], env).stdout)


def group_lag(env: dict[str, str], group: str, topic: str) -> int | None:
    return status(env).get("lag", {}).get(group, {}).get(topic)


def fetch(url: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of a GET, the connection closed; an HTTP error status raises HTTPError."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return answer.status, answer.read()


def variant(spec, settings, version: str, scale: float) -> Path:
    """A second model: the baseline with its output layer scaled, saved and signed like any artifact."""
    import torch

    from models.artifacts import save_artifact
    from models.baseline import baseline_model

    model, normaliser = baseline_model(spec)
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(scale)
    directory = settings.artifacts_dir / spec.name / version
    save_artifact(directory, model, normaliser, {"version": version, "spec_hash": spec.spec_hash},
                  settings.signing_key())
    return directory
