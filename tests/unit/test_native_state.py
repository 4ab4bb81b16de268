"""What the native engine accepts from its changelog on a restore: only records it writes itself."""

from __future__ import annotations

import pickle

import pytest

from streams.engines.native_state import MARKER_KEY, entity_value, marker_value, refusal


def test_the_engines_own_records_pass():
    assert refusal(MARKER_KEY, marker_value(0)) is None
    assert refusal(MARKER_KEY, marker_value(123_456)) is None
    assert refusal(b"c-1", entity_value(42, b'["tag",1,2,[],[],{}]')) is None


@pytest.mark.parametrize(("key", "value", "why"), [
    (MARKER_KEY, b"not json", "not JSON"),
    (MARKER_KEY, b'{"next_offset": -5}', "a partition marker without a next_offset >= 0"),
    (MARKER_KEY, b'{"next_offset": 1.5}', "a partition marker without a next_offset >= 0"),
    (MARKER_KEY, b"[1]", "a partition marker without a next_offset >= 0"),
    (b"c-1", b"short", "an entity value without its offset"),
    (b"c-1", entity_value(-1, b"[1]"), "an entity value without its offset"),
    (b"c-1", entity_value(7, pickle.dumps({"a": 1})), "not JSON"),
    (b"c-1", entity_value(7, b'["tag", NaN]'), "not JSON"),
    (b"c-1", entity_value(7, b'{"state": 1}'), "an entity state that is not a JSON array"),
])
def test_anything_else_is_refused_with_its_reason(key, value, why):
    assert refusal(key, value).startswith(why)
