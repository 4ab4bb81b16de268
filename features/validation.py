"""The first step of every engine: raw Kafka bytes -> a typed Event, or the reason it is not one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from features.spec import PipelineSpec

# Epoch milliseconds outside these bounds (years ~1970 to ~2286) are almost surely seconds or micros.
_MIN_MS, _MAX_MS = 0, 10**13
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Event:
    """A record that passed validation: its entity key, id, event time and typed field values."""

    key: str
    event_id: str
    event_time_ms: int
    values: dict[str, Any]


class Invalid(str):
    """The reason a record was refused; goes to the DLQ's eddy.error header."""


# iso_ms formats each second once: consecutive events mostly share their second.
_CACHE_LIMIT = 100_000
_SECOND_TEXT: dict[int, str] = {}  # epoch second -> "YYYY-MM-DDTHH:MM:SS"


def parse_timestamp(value: Any) -> int | None:
    """ISO-8601 with an offset, or integer epoch milliseconds -> epoch ms; None when neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if _MIN_MS <= value < _MAX_MS else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return int(parsed.timestamp() * 1000 + (0.5 if parsed.timestamp() >= 0 else -0.5))
    return None


def iso_ms(epoch_ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds and a Z: the form eddy writes times in."""
    second, millis = divmod(int(epoch_ms), 1000)
    text = _SECOND_TEXT.get(second)
    if text is None:
        if len(_SECOND_TEXT) >= _CACHE_LIMIT:
            _SECOND_TEXT.clear()
        text = _SECOND_TEXT[second] = f"{_EPOCH + timedelta(seconds=second):%Y-%m-%dT%H:%M:%S}"
    return f"{text}.{millis:03d}Z"


def _check_string(v: Any) -> bool:
    return isinstance(v, str)


def _check_float(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bool(v: Any) -> bool:
    return isinstance(v, bool)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "string": (_check_string, "a string"),
    "double": (_check_float, "a finite number"),
    "float": (_check_float, "a finite number"),
    "long": (_check_int, "an integer"),
    "int": (_check_int, "an integer"),
    "boolean": (_check_bool, "true or false"),
}


# The Python types a valid JSON value of each schema type has (the fast path of Validator.check).
_FAST_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "double": (float, int), "float": (float, int),
                                             "long": (int,), "int": (int,), "boolean": (bool,)}


class Validator:
    """Checks records against the spec's schema: a record at most source.max_record_bytes long; every
    schema field present, non-null and of its type; an enum field one of its values; a field outside
    the schema ignored (it stays in the raw record), or refused with source.extra_fields: refuse."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self._fields = [(name, typ, *_CHECKS.get(typ, (None, ""))) for name, typ in spec.field_types.items()]
        self._key, self._id, self._ts = spec.key, spec.id_field, spec.timestamp_field
        self._fast = tuple((name, _FAST_TYPES[typ]) for name, typ in spec.field_types.items() if typ in _FAST_TYPES)
        self._floats = tuple(name for name, typ in spec.field_types.items() if typ in ("double", "float"))
        self._other_times = tuple(name for name, typ in spec.field_types.items()
                                  if typ == "timestamp" and name != self._ts)
        self._enums = tuple((name, frozenset(values)) for name, values in spec.enums.items())
        self._enum_text = {name: ", ".join(values) for name, values in spec.enums.items()}
        self._max_bytes = spec.max_record_bytes
        self._schema_only = spec.extra_fields == "refuse"
        self._names = frozenset(spec.field_types)

    def parse(self, raw: bytes | None) -> Event | Invalid:
        """The Event, or Invalid(reason). Never raises on any input bytes."""
        if not raw:
            return Invalid("empty record")
        if len(raw) > self._max_bytes:
            return Invalid(f"record of {len(raw):,} bytes is over the bound of {self._max_bytes:,} "
                           "(source.max_record_bytes)")
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return Invalid(f"not JSON: {str(exc)[:120]}")
        if not isinstance(record, dict):
            return Invalid(f"expected a JSON object, got {type(record).__name__ if record is not None else 'null'}")
        return self.check(record)

    def check(self, record: dict[str, Any]) -> Event | Invalid:
        """The Event, or Invalid naming the first field at fault."""
        # The common case, a valid record, on exact types; anything else takes the full check,
        # which alone words the reasons.
        get = record.get
        for name, types in self._fast:
            if type(get(name)) not in types:
                return self._check(record)
        for name in self._floats:
            v = record[name]
            if v - v != 0:  # inf or nan
                return self._check(record)
        for name in self._other_times:
            if parse_timestamp(get(name)) is None:
                return self._check(record)
        for name, values in self._enums:
            if record[name] not in values:
                return self._check(record)
        if self._schema_only and not self._names.issuperset(record):
            return self._check(record)
        key, event_id = get(self._key), get(self._id)
        event_time = parse_timestamp(get(self._ts))
        if event_time is None or key is None or event_id is None or key == "" or event_id == "":
            return self._check(record)
        return Event(str(key), str(event_id), event_time, record)

    def _check(self, record: dict[str, Any]) -> Event | Invalid:
        event_time = None
        for name, typ, check, expected in self._fields:
            value = record.get(name)
            if value is None:
                return Invalid(f"field {name!r} is missing" if name not in record else f"field {name!r} is null")
            if typ == "timestamp":
                parsed = parse_timestamp(value)
                if parsed is None:
                    return Invalid(f"field {name!r}: {str(value)[:40]!r} is not ISO-8601 with an offset or epoch milliseconds")
                if name == self._ts:  # the event time is the source's timestamp field, not another one
                    event_time = parsed
            elif not check(value):
                return Invalid(f"field {name!r}: expected {expected} ({typ}), got {type(value).__name__}")
        for name, values in self._enums:
            if record[name] not in values:
                return Invalid(f"field {name!r}: {str(record[name])[:40]!r} is not one of {self._enum_text[name]}")
        if self._schema_only:
            extra = sorted(k for k in record if k not in self._names)
            if extra:
                return Invalid(f"field {str(extra[0])[:40]!r} is not in the schema (source.extra_fields: refuse)")
        key, event_id = record[self._key], record[self._id]
        if key == "" or event_id == "":
            return Invalid(f"field {(self._key if key == '' else self._id)!r} is empty")
        if event_time is None:
            event_time = parse_timestamp(record[self._ts])
            if event_time is None:  # not reached: the spec's timestamp field is a schema field, checked above
                return Invalid(f"field {self._ts!r} is not ISO-8601 with an offset or epoch milliseconds")
        return Event(str(key), str(event_id), event_time, record)
