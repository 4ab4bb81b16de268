"""The validator's fast path (exact types, for valid records) decides as its full check does, on any
record; iso_ms, which caches the text of each second, writes what datetime writes."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.spec import load_spec, parse_spec
from features.validation import Event, Invalid, Validator, iso_ms

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
SPECS = [load_spec(PIPELINES / "fraud.yaml"), load_spec(PIPELINES / "sensors.yaml")]

# A spec with every schema type, a second timestamp field, and an integer key.
ALL_TYPES = parse_spec({
    "name": "all", "entity": {"name": "thing", "key": "thing_id"},
    "source": {"topic": "things", "id": "id", "timestamp": "ts", "allowed_lateness": "5s",
               "schema": {"id": "string", "ts": "timestamp", "thing_id": "long", "seen": "timestamp",
                          "x": "double", "y": "float", "n": "int", "flag": "boolean", "label": "string"}},
    "features": [{"name": "n_1m", "agg": "count", "window": "1m"}],
    "model": {"name": "m", "kind": "mlp"},
})

# The same with an enum field, a size bound, and fields outside the schema refused.
STRICT = parse_spec({
    "name": "strict", "entity": {"name": "thing", "key": "thing_id"},
    "source": {"topic": "things", "id": "id", "timestamp": "ts", "max_record_bytes": "1KiB", "extra_fields": "refuse",
               "schema": {"id": "string", "ts": "timestamp", "thing_id": "long", "x": "double",
                          "channel": {"enum": ["online", "pos", "atm"]}}},
    "features": [{"name": "n_1m", "agg": "count", "window": "1m"}],
    "model": {"name": "m", "kind": "mlp"},
})

_ANY = st.one_of(st.none(), st.booleans(), st.integers(-10**15, 10**15), st.floats(allow_nan=True),
                 st.text(max_size=30), st.sampled_from(["", "2026-11-22T10:00:00.123Z", "2026-11-22T10:00:00+02:00",
                                                        "2026-11-22T10:00:00", "yesterday"]),
                 st.lists(st.integers(), max_size=2))


def _outcome(result):
    return ("event", result.key, result.event_id, result.event_time_ms) if isinstance(result, Event) else ("invalid", str(result))


@settings(max_examples=600, deadline=None)
@given(data=st.data(), which=st.integers(0, len(SPECS) + 1))
def test_the_fast_path_decides_as_the_full_check(data, which):
    spec = ([*SPECS, ALL_TYPES, STRICT])[which]
    validator = Validator(spec)
    record = {}
    for name in spec.field_types:
        roll = data.draw(st.integers(0, 19))
        if roll < 17:  # mostly well-typed values, so that whole valid records come up often
            values = spec.enums.get(name)
            record[name] = data.draw(st.sampled_from(values) if values else _valid_value(spec.field_types[name]))
        elif roll < 19:
            record[name] = data.draw(_ANY)
    if data.draw(st.integers(0, 9)) == 0:
        record["extra"] = data.draw(_ANY)
    assert _outcome(validator.check(record)) == _outcome(validator._check(record))


def _valid_value(kind: str):
    return {"string": st.text(min_size=0, max_size=8), "double": st.floats(allow_nan=True, allow_infinity=True),
            "float": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-5, 5),
            "long": st.integers(-10**12, 10**12), "int": st.integers(-5, 5), "boolean": st.booleans(),
            "timestamp": st.integers(0, 10**13) | st.just("2026-11-22T10:00:00.123Z")}[kind]


def test_a_valid_record_becomes_its_event():
    validator = Validator(ALL_TYPES)
    record = {"id": "e-1", "ts": "2026-11-22T10:00:00.123Z", "thing_id": 42, "seen": 1795341600000, "x": 1,
              "y": 2.5, "n": 3, "flag": False, "label": "ok"}
    event = validator.check(record)
    assert event == Event("42", "e-1", 1795341600123, record)
    for field, bad in [("x", math.inf), ("n", True), ("flag", 0), ("seen", "soon"), ("label", None), ("id", "")]:
        assert isinstance(validator.check({**record, field: bad}), Invalid), field


def test_an_oversized_record_an_enum_value_outside_its_list_and_an_extra_field_are_refused_with_reasons():
    import orjson

    validator = Validator(STRICT)
    record = {"id": "e-1", "ts": 1795341600123, "thing_id": 7, "x": 2.5, "channel": "pos"}
    assert validator.parse(orjson.dumps(record)) == Event("7", "e-1", 1795341600123, record)
    big = orjson.dumps({**record, "id": "e" * 1100})
    assert validator.parse(big) == f"record of {len(big):,} bytes is over the bound of 1,024 (source.max_record_bytes)"
    assert validator.parse(orjson.dumps({**record, "channel": "web"})) == \
        "field 'channel': 'web' is not one of online, pos, atm"
    assert validator.parse(orjson.dumps({**record, "note": 1})) == \
        "field 'note' is not in the schema (source.extra_fields: refuse)"


def test_by_default_a_field_outside_the_schema_is_ignored_and_stays_in_the_record():
    validator = Validator(ALL_TYPES)
    record = {"id": "e-1", "ts": "2026-11-22T10:00:00.123Z", "thing_id": 42, "seen": 1795341600000, "x": 1,
              "y": 2.5, "n": 3, "flag": False, "label": "ok", "note": "from a newer producer"}
    event = validator.check(record)
    assert isinstance(event, Event) and event.values["note"] == "from a newer producer"
    assert ALL_TYPES.max_record_bytes == 64 * 1024 and ALL_TYPES.extra_fields == "ignore"


@pytest.mark.parametrize("ms", [0, 1, 999, 1000, -1, -1001, 1795341600123, 253402300799999])
def test_iso_ms_writes_what_datetime_writes(ms):
    t = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert iso_ms(ms) == f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z"
    assert iso_ms(ms) == iso_ms(ms)  # the cached second gives the same text


@settings(max_examples=300, deadline=None)
@given(st.integers(-10**12, 10**13))
def test_iso_ms_on_any_time(ms):
    t = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert iso_ms(ms) == f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z"
