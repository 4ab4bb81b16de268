"""Heartbeats: each long-running part writes its counters to Redis about once a second, and
`eddy status` reads them, so status reports what the processes themselves measured."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import orjson

TTL_S = 30


def metrics_key(pipeline: str, component: str) -> str:
    return f"eddy:{pipeline}:metrics:{component}"


class Heartbeat:
    """beat() records counters; events/s is derived from the `events` counter between beats."""

    def __init__(self, redis_client, pipeline: str, component: str, every_s: float = 1.0) -> None:
        self.redis = redis_client
        self.key = metrics_key(pipeline, component)
        self.field = f"{socket.gethostname()}:{os.getpid()}"
        self.every_s = every_s
        self._last_t = time.monotonic()
        self._last_events = 0
        self._last_beat = 0.0

    def beat(self, events: int, force: bool = False, **extra: Any) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < self.every_s:
            return
        rate = (events - self._last_events) / max(1e-9, now - self._last_t)
        self._last_t, self._last_events, self._last_beat = now, events, now
        payload = {"events": events, "events_per_s": round(rate, 1), "updated_at": time.time(),
                   "pid": os.getpid(), **extra}
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(self.key, self.field, orjson.dumps(payload))
            pipe.expire(self.key, TTL_S)
            pipe.execute()
        except Exception:  # noqa: BLE001 - metrics never stop the work they describe
            pass


def read_metrics(redis_client, pipeline: str, component: str, max_age_s: float = 10.0) -> list[dict[str, Any]]:
    """The fresh heartbeats of every replica of a component."""
    now = time.time()
    out = []
    for field, raw in (redis_client.hgetall(metrics_key(pipeline, component)) or {}).items():
        data = orjson.loads(raw)
        if now - data.get("updated_at", 0) <= max_age_s:
            out.append({"replica": field.decode() if isinstance(field, bytes) else field, **data})
    return out
