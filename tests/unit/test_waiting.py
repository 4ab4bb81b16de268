"""wait_until and poll: the first truthy value, a timeout that names what was awaited, a last look at the deadline."""

from __future__ import annotations

import time

import pytest

from features.errors import ServiceError
from features.waiting import TimedOut, poll, wait_until


def test_returns_the_first_truthy_value_after_polling():
    values = iter([0, None, [], {"ready": 1}, "later"])
    assert wait_until(lambda: next(values), 5, "a value", every_s=0) == {"ready": 1}


def test_timeout_names_what_was_awaited_and_is_a_service_error():
    calls = []
    started = time.monotonic()
    with pytest.raises(TimedOut, match=r"timed out after 0.3s waiting for the broker") as caught:
        wait_until(lambda: calls.append(1), 0.3, "the broker", every_s=0.05)
    assert 0.3 <= time.monotonic() - started < 3
    assert isinstance(caught.value, ServiceError) and len(calls) >= 4


def test_poll_gives_the_last_falsy_value_and_looks_once_more_at_the_deadline():
    ready_at = time.monotonic() + 0.25
    assert poll(lambda: time.monotonic() >= ready_at, 0.25, every_s=10) is True  # one sleep, cut to the deadline
    assert poll(lambda: 0, 0.05, every_s=0.01) == 0
    assert poll(lambda: "now", 0) == "now"  # a zero timeout still asks once
