"""Per-entity scoring state in Redis, safe under replay.

Each entity keeps its last N feature rows tagged with the (partition, offset) of the features record
that brought them. A batch redone after a crash reads only the rows older than each record's own
offset and appends a row only once, so a replay scores exactly as the first attempt and never
double-applies (the scorer's Kafka transaction makes the prediction itself exactly-once)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson


class HistoryStore:
    """get_many / put_many of entity histories, one pipelined round trip each per batch."""

    def __init__(self, redis_client, namespace: str, keep: int, ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis = redis_client
        self.prefix = f"eddy:{namespace}:hist:"
        self.keep = keep
        self.ttl_s = ttl_s

    def get_many(self, entities: Sequence[str]) -> dict[str, list]:
        """entity -> [[partition, offset, features], ...] oldest first (empty when unknown)."""
        unique = list(dict.fromkeys(entities))
        if not unique:
            return {}
        raw = self.redis.mget([self.prefix + e for e in unique])
        return {e: (orjson.loads(r) if r else []) for e, r in zip(unique, raw, strict=True)}

    def put_many(self, histories: dict[str, list]) -> None:
        if not histories:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entity, rows in histories.items():
            pipe.set(self.prefix + entity, orjson.dumps(rows[-self.keep:]), ex=self.ttl_s)
        pipe.execute()


def history_before(rows: list, partition: int | str, offset: int) -> list:
    """The entity's rows that came before the record at (partition, offset)."""
    return [r for r in rows if r[0] != partition or r[1] < offset]


def append_once(rows: list, partition: int | str, offset: int, features: dict, keep: int) -> list:
    """rows with this record's features appended unless a replay already put them there."""
    if any(r[0] == partition and r[1] == offset for r in rows):
        return rows
    return [*rows, [partition, offset, features]][-keep:]
