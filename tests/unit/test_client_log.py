"""librdkafka's repeated reports (a failed reconnect every 50 ms while a broker is away) are logged once a
kind every 10 s, and the next one says how many were held back."""

from __future__ import annotations

import logging

from streams.kafka import Repeats


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("eddy.kafka.client", logging.ERROR, __file__, 1, message, (), None)


def refused(port: int, after_ms: int) -> logging.LogRecord:
    return record(f"FAIL [rdkafka#consumer-2] [thrd:sasl_ssl://127.0.0.1:{port}/bootstrap]: Connect to "
                  f"ipv4#127.0.0.1:{port} failed: Connection refused (after {after_ms}ms in state CONNECT)")


def test_a_burst_of_one_kind_is_one_line_then_a_count_of_the_rest():
    now = [0.0]
    repeats = Repeats(every_s=10.0, clock=lambda: now[0])
    let_through = []
    for step in range(260):  # 13 s of reconnects, every 50 ms
        now[0] = step * 0.05
        entry = refused(42629, step % 3)
        if repeats.filter(entry):
            let_through.append(entry.getMessage())
    assert len(let_through) == 2
    assert let_through[0].endswith("(after 0ms in state CONNECT)")
    assert let_through[1].endswith("(199 more like it in the last 10s)")


def test_other_kinds_pass_through_and_a_quiet_kind_is_logged_again():
    now = [0.0]
    repeats = Repeats(every_s=10.0, clock=lambda: now[0])
    assert repeats.filter(refused(1, 0))
    assert repeats.filter(record("GETPID [rdkafka#producer-4]: Failed to acquire transactional PID: retrying"))
    assert not repeats.filter(refused(1, 5))
    now[0] = 10.0
    again = refused(1, 0)
    assert repeats.filter(again) and again.getMessage().endswith("(1 more like it in the last 10s)")
    now[0] = 30.0
    quiet = refused(1, 0)
    assert repeats.filter(quiet) and "more like it" not in quiet.getMessage()
