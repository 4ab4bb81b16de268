"""The Faust engine's per-partition source positions, kept in its table beside the entity states: a
restore keeps a position that is a number and refuses one that is not, as it refuses a state it cannot
read; the rest (drop what a position covers, read back what Faust skipped) is the kill test's, against a
real broker (tests/integration/test_engine_kill.py)."""

from __future__ import annotations

from pathlib import Path

from features.spec import load_spec
from features.windows import FeatureLogic
from streams.engines.faust_engine import _Positions, _Repairs, position_key

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
