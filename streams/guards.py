"""What keeps a stage from hanging or spinning on a fault: the backoff that waits a fault out, the
watchdog that ends a process whose Kafka call never returns, and the guard that ends one whose consumer
stopped fetching. An ended process is restarted by supervision."""

from __future__ import annotations

import logging
import os
import threading
import time

from confluent_kafka import Consumer, KafkaException

log = logging.getLogger(__name__)

# A transaction call that has not returned after this long (each is given 30 s, so twice that) is stuck:
# seen with librdkafka's send_offsets_to_transaction after the only broker was killed and came back. The
# process ends, supervision starts it again, and its new producer fences the stuck transaction.
STUCK_CALL_S = 60.0
# A consumer with readable records that receives none for this long is stalled: seen with librdkafka
# after the only broker restarted, a group member whose session had timed out rejoined and was
# assigned its partitions again, then never fetched. Longer than a transaction's timeout (60 s), so
# offsets an ended owner left pending are settled by then. The process ends for supervision.
STALLED_S = 90.0


class Backoff:
    """Waits between tries of work a fault stopped: 0.1 s doubling to 5 s; says so once per fault in
    the log (not once per try) and once more when the work goes through again."""

    def __init__(self, logger: logging.Logger, first_s: float = 0.1, most_s: float = 5.0) -> None:
        self.log, self.first_s, self.most_s = logger, first_s, most_s
        self.tries, self.since = 0, 0.0

    def waiting(self, reason: str) -> None:
        if self.tries == 0:
            self.since = time.monotonic()
            self.log.warning("waiting out a fault, retrying with backoff: %s", reason)
        time.sleep(min(self.most_s, self.first_s * 2 ** self.tries))
        self.tries += 1

    def cleared(self) -> None:
        if self.tries:
            self.log.warning("resumed after %d tries over %.1fs", self.tries, time.monotonic() - self.since)
            self.tries = 0


class Progress:
    """Whether a consumer is stalled: a partition had records to read at the same position (or none
    yet) in every observation over `limit_s`. A batch consumed in between moves its position, which
    starts its count again."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._since: dict[tuple[str, int], tuple[int, float]] = {}

    def stalled(self, behind: dict[tuple[str, int], int], now: float) -> bool:
        """`behind`: each partition with records past its position, and that position (< 0: none yet)."""
        since = {}
        for tp, offset in behind.items():
            seen = self._since.get(tp)
            since[tp] = seen if seen is not None and seen[0] == offset else (offset, now)
        self._since = since
        return any(now - started >= self.limit_s for _offset, started in since.values())


class StallGuard:
    """Called while a stage's consumer is idle: about every 5 s, asks the brokers where each assigned
    partition's readable records end (the last stable offset, as the consumer reads committed), and
    ends the process (status 70, for supervision to restart the stage) when records were there to
    read and none came for STALLED_S."""

    def __init__(self, consumer: Consumer, limit_s: float = STALLED_S, every_s: float = 5.0) -> None:
        self.consumer, self.every_s = consumer, every_s
        self._progress = Progress(limit_s)
        self._asked_at = 0.0

    def idle(self) -> None:
        now = time.monotonic()
        if now - self._asked_at < self.every_s:
            return
        self._asked_at = now
        behind = self.behind()
        if behind is not None and self._progress.stalled(behind, now):
            log.error("records are there to read on %s but none came for %.0fs: exiting for supervision to "
                      "restart this stage", sorted(behind), self._progress.limit_s)
            logging.shutdown()
            os._exit(70)

    def behind(self) -> dict[tuple[str, int], int] | None:
        """Each assigned partition with records past the consumer's position, and that position (< 0:
        none yet); None when the brokers do not answer."""
        behind = {}
        for tp in self.consumer.position(self.consumer.assignment()):
            try:
                _low, end = self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            except KafkaException:
                return None
            if end > max(tp.offset, 0):
                behind[(tp.topic, tp.partition)] = tp.offset
        return behind


class Watchdog:
    """`with watchdog:` around a call that must return: if it has not after `limit_s`, the process
    exits (status 70) with a log line, for supervision to restart it."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._since: float | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> None:
        self._since = time.monotonic()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._since = None

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            since = self._since
            if since is not None and time.monotonic() - since > self.limit_s:
                log.error("a Kafka transaction call has not returned in %.0fs: exiting for supervision to "
                          "restart this stage (its next producer fences the stuck transaction)", self.limit_s)
                logging.shutdown()
                os._exit(70)
