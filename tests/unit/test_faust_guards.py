"""The Faust engine's guards against Faust itself. Its per-partition source positions, kept in its table
beside the entity states: a restore keeps a position that is a number and refuses one that is not, as it
refuses a state it cannot read (the rest, dropping what a position covers and reading back what Faust
skipped, is the kill test's, against a real broker: tests/integration/test_engine_kill.py). And its bound
on a commit: one that hangs ends the process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from features.spec import load_spec
from features.windows import FeatureLogic
from streams.engines import faust_engine
from streams.engines.faust_engine import _bounded, _Positions, _Repairs, position_key

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def repairs() -> _Repairs:
    return _Repairs(FeatureLogic(load_spec(PIPELINES / "fraud.yaml")))


def test_a_position_restores_when_it_is_a_number_and_is_refused_otherwise():
    check = repairs()
    assert check.reason(position_key(2), b"5080") is None
    assert check.reason(position_key(2), b"-1") == "a source position that is not a number"
    assert check.reason(position_key(2), b"\x80\x04K\x01.") == "a source position that is not a number"


def test_an_entity_key_is_still_checked_as_a_state():
    logic = FeatureLogic(load_spec(PIPELINES / "fraud.yaml"))
    check = _Repairs(logic)
    assert check.reason(b"c-1", logic.dumps(logic.new_state())) is None
    assert check.reason(b"c-1", b"5080") is not None  # a number is a position only under a position key
    assert check.reason(None, b'["x", NaN]') is not None


def test_a_partitions_position_is_read_from_its_own_key():
    store = {position_key(0): b"17", position_key(1): b"4242"}
    assert (_Positions.of(store, 0), _Positions.of(store, 1), _Positions.of(store, 2)) == (17, 4242, None)
    assert position_key(1) != position_key(11) and not position_key(1).startswith(position_key(11))


class Exited(Exception):
    pass


def test_a_commit_that_ends_in_time_returns_and_one_that_hangs_ends_the_process(monkeypatch):
    def exit_(code: int):
        raise Exited(code)

    monkeypatch.setattr(faust_engine, "COMMIT_TIMEOUT_S", 0.2)
    monkeypatch.setattr(faust_engine.os, "_exit", exit_)
    monkeypatch.setattr(faust_engine.logging, "shutdown", lambda: None)

    async def commit(seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return True

    assert asyncio.run(_bounded(commit(0.01))) is True
    with pytest.raises(Exited) as exited:
        asyncio.run(_bounded(commit(30)))
    assert exited.value.args == (70,)
