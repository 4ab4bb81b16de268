"""A restore read that stops getting anything gives up after STALL_S, so supervision can start the stage
again; one that keeps getting records never does (streams.engines.native_state._Progress)."""

from __future__ import annotations

import pytest

from features.waiting import TimedOut
from streams.engines import native_state


def test_a_stalled_read_gives_up_and_a_moving_one_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 1000.0}
    monkeypatch.setattr(native_state.time, "monotonic", lambda: clock["now"])
    moving, stalled = native_state._Progress("moving"), native_state._Progress("restoring from t")
    for step in range(1, 200):  # 199 s in steps of a second
        clock["now"] = 1000.0 + step
        moving.check((step, 3))  # a record every second
        if step <= native_state.STALL_S:
            stalled.check((0, 3))
    with pytest.raises(TimedOut, match=r"restoring from t: nothing read for 60s"):
        stalled.check((0, 3))
