"""Dedupe by the spec's id field, kept in Redis so it survives restarts and is shared by replicas.

Each id maps to the (partition, offset) of the first record that carried it. A replay of that same
record after a crash is therefore not a duplicate, so an aborted Kafka transaction never loses an event."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_RETENTION_MS = 24 * 3600 * 1000


# One call per batch: SET NX GET for each id, answering 1 for a first sighting or a replay of the
# same position and 0 for a duplicate. Packing one command of 2N arguments costs the client ~0.6 us
# an id, against ~5 us for N pipelined SETs.
_FIRST_SEEN = """
local out = {}
for i = 1, #KEYS do
  local before = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'GET', 'PX', ARGV[1])
  if (not before) or before == ARGV[i + 1] then out[i] = 1 else out[i] = 0 end
end
return out
"""


class Deduper:
    """first_seen() for a batch in one Redis round trip: a server-side script, or pipelined
    SET NX GET where the server refuses scripts."""

    def __init__(self, redis_client, namespace: str, retention_ms: int = DEFAULT_RETENTION_MS) -> None:
        self.redis = redis_client
        self.prefix = f"eddy:{namespace}:seen:"
        self.retention_ms = retention_ms
        self.duplicates = 0
        self._script = redis_client.register_script(_FIRST_SEEN)
        self._scripts_allowed = True

    def first_seen(self, records: Sequence[tuple[str, str]]) -> list[bool]:
        """For (record id, source position) pairs: True for the first record with that id, or a replay of
        it from the same position; False for a duplicate, which is counted."""
        if not records:
            return []
        if self._scripts_allowed:
            from redis.exceptions import NoPermissionError, ResponseError

            prefix = self.prefix
            try:
                flags = self._script(keys=[prefix + rid for rid, _ in records],
                                     args=[self.retention_ms, *(position for _, position in records)])
            except (NoPermissionError, ResponseError) as exc:
                if not isinstance(exc, NoPermissionError) and "unknown command" not in str(exc).lower():
                    raise
                self._scripts_allowed = False  # EVAL renamed away or not allowed by an ACL
            else:
                out = [flag == 1 for flag in flags]
                self.duplicates += len(out) - sum(out)
                return out
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
