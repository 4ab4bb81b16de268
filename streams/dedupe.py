"""Dedupe by the spec's id field, kept in Redis so it survives restarts and is shared by replicas.

Each id maps to the (partition, offset) of the first record that carried it. A replay of that same
record after a crash is therefore not a duplicate, so an aborted Kafka transaction never loses an event."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_RETENTION_MS = 24 * 3600 * 1000


class Deduper:
    """first_seen() for a batch in one Redis round trip (SET NX GET, pipelined)."""

    def __init__(self, redis_client, namespace: str, retention_ms: int = DEFAULT_RETENTION_MS) -> None:
        self.redis = redis_client
        self.prefix = f"eddy:{namespace}:seen:"
        self.retention_ms = retention_ms
        self.duplicates = 0

    def first_seen(self, records: Sequence[tuple[str, str]]) -> list[bool]:
        """For (record id, source position) pairs: True for the first record with that id, or a replay of
        it from the same position; False for a duplicate, which is counted."""
        if not records:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for record_id, position in records:
            pipe.set(self.prefix + record_id, position, nx=True, get=True, px=self.retention_ms)
        previous = pipe.execute()
        out = []
        for (_, position), before in zip(records, previous, strict=True):
            first = before is None or before.decode() == position
            out.append(first)
            self.duplicates += not first
        return out
