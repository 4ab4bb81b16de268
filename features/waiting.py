"""Waiting for a condition under a deadline: the one poll loop that services, stages and tests share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from features.errors import ServiceError

T = TypeVar("T")

# A plain loop rather than tenacity: retry_if_result + stop_after_delay + wait_fixed say the same in more
# lines, and its RetryError would need unwrapping into an error that names what was awaited.


class TimedOut(ServiceError):
    """wait_until's deadline passed; the message names what was awaited."""


def poll(predicate: Callable[[], T], timeout_s: float, every_s: float = 0.2) -> T:
    """predicate()'s first truthy value, calling it every `every_s` seconds; its last (falsy) value once
    `timeout_s` have passed. It is called at least once, and once more at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        left = deadline - time.monotonic()
        if value or left <= 0:
            return value
        time.sleep(min(every_s, left))


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.2) -> T:
    """Like poll, but TimedOut naming `what` when predicate() stayed falsy for `timeout_s`."""
    value = poll(predicate, timeout_s, every_s)
    if not value:
        raise TimedOut(f"timed out after {timeout_s:g}s waiting for {what}")
    return value
