"""Feature rows into Feast's Redis online store, written in Feast's own layout with pipelined Redis
calls, without the DataFrame -> Arrow -> proto conversion of FeatureStore.write_to_online_store
(~100 us a row; this is ~10x less).

The layout is Feast's: the hash key is Feast's serialised entity key plus the project, fields are
Feast's murmur3 hashes of "view:feature" holding ValueProto bytes, and "_ts:view" holds the row's
event time as a Timestamp proto. Feast computes the key and field names (its own helpers); a row
whose event time is not newer than the stored one is skipped, as Feast's writer skips it. So
get_online_features, `eddy features get` and any Feast client read these rows unchanged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MAX_CACHED_KEYS = 200_000


class FeastRedisWriter:
    """write() puts each entity's row in one pipelined round trip for the read of the stored event
    times and one for the writes."""

    def __init__(self, store, view_name: str, join_key: str, dtypes: Mapping[str, str], redis_client) -> None:
        from feast.infra.online_stores.helpers import _mmh3
        from feast.infra.online_stores.redis import _versioned_fv_name

        config = store.config
        view = store.get_feature_view(view_name)
        versioned = _versioned_fv_name(view, config)
        self.project = config.project
        self.serialization = config.entity_key_serialization_version
        self.join_key = join_key
        self.redis = redis_client
        self.ts_field = f"_ts:{versioned}".encode()
        self.key_ttl_s = getattr(config.online_store, "key_ttl_seconds", None)
        # (feature name, hashed field, ValueProto field for its type)
        self.columns = [(name, _mmh3(f"{versioned}:{name}"), "int64_val" if kind == "Int64" else "double_val")
                        for name, kind in dtypes.items()]
        self._keys: dict[str, bytes] = {}

    def redis_key(self, entity_id: str) -> bytes:
        key = self._keys.get(entity_id)
        if key is None:
            from feast.infra.online_stores.helpers import _redis_key
            from feast.protos.feast.types.EntityKey_pb2 import EntityKey
            from feast.protos.feast.types.Value_pb2 import Value

            if len(self._keys) >= MAX_CACHED_KEYS:
                self._keys.clear()
            entity = EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=entity_id)])
            key = self._keys[entity_id] = _redis_key(self.project, entity, self.serialization)
        return key

    def write(self, entity_ids: Sequence[str], event_ms: Sequence[int], rows: Sequence[Mapping[str, Any]]) -> int:
        """Each entity's row (one per entity) where it is newer than the stored one; returns the
        rows written. TypeError or ValueError, with nothing written, when a value does not fit its
        feature's type (a null or fractional count)."""
        from feast.protos.feast.types.Value_pb2 import Value
        from google.protobuf.timestamp_pb2 import Timestamp

        keys = [self.redis_key(e) for e in entity_ids]
        hashes = []
        columns, ts_field = self.columns, self.ts_field
        for t, row in zip(event_ms, rows, strict=True):
            fields = {ts_field: Timestamp(seconds=t // 1000, nanos=(t % 1000) * 1_000_000).SerializeToString()}
            for name, field, kind in columns:
                v = row.get(name)
                if v is None or v != v:  # null, or NaN: Feast's null
                    if kind == "int64_val":
                        raise TypeError(f"feature {name!r} is null but its type is Int64")
                    fields[field] = b""
                elif kind == "int64_val":
                    if type(v) is not int:
                        raise TypeError(f"feature {name!r} is {v!r}, not an integer")
                    fields[field] = Value(int64_val=v).SerializeToString()
                else:
                    fields[field] = Value(double_val=v).SerializeToString()
            hashes.append(fields)
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, ts_field)
        stored = pipe.execute()
        written = 0
        for key, t, fields, before in zip(keys, event_ms, hashes, stored, strict=True):
            if before:
                previous = Timestamp.FromString(before)
                if t * 1_000_000 <= previous.seconds * 1_000_000_000 + previous.nanos:
                    continue
            pipe.hset(key, mapping=fields)
            if self.key_ttl_s:
                pipe.expire(key, self.key_ttl_s)
            written += 1
        if written:
            pipe.execute()
        return written
