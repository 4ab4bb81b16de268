"""The one apply step every engine and the backfill share: rows for admitted events, and the same
refusals for the same records (values the aggregations cannot take, event times too far ahead)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from features.apply import ApplyStep, Refused
from features.errors import SpecError
from features.spec import DEFAULT_MAX_FUTURE_MS, parse_spec
from features.validation import Event
from features.windows import FeatureRow

FRAUD = yaml.safe_load((Path(__file__).resolve().parents[2] / "pipelines" / "fraud.yaml").read_text())
T = 1_795_341_600_123


def event(t: int, event_id: str = "e", amount: object = 10.0) -> Event:
    return Event("c-1", event_id, t, {"event_id": event_id, "card_id": "c-1", "merchant_id": "m-1",
                                       "amount": amount, "currency": "EUR", "country": "DE", "channel": "online"})


def test_an_event_ahead_of_its_arrival_by_more_than_max_future_is_refused_and_leaves_the_state_alone():
    step = ApplyStep(parse_spec(FRAUD))
    state = step.logic.new_state()
    assert isinstance(step.apply(state, event(T, "a"), arrival_ms=T), FeatureRow)
    before = step.logic.dumps(state)
    refused = step.apply(state, event(T + DEFAULT_MAX_FUTURE_MS + 1, "b"), arrival_ms=T)
    assert isinstance(refused, Refused) and "ahead of the record's Kafka timestamp" in refused
    assert "source.max_future is 300s" in refused
    assert step.logic.dumps(state) == before  # the entity's clock did not move
    at_bound = step.apply(state, event(T + DEFAULT_MAX_FUTURE_MS, "c"), arrival_ms=T)  # the bound is allowed
    assert isinstance(at_bound, FeatureRow) and at_bound.features["txn_count_1m"] == 1
    assert isinstance(step.apply(state, event(T + 10**9, "d"), arrival_ms=None), FeatureRow)  # no timestamp: no rule


def test_a_value_the_aggregations_cannot_take_is_refused_with_its_reason():
    step = ApplyStep(parse_spec(FRAUD))
    state = step.logic.new_state()
    refused = step.apply(state, event(T, amount=float("nan")), arrival_ms=T)
    assert isinstance(refused, Refused) and "'amount'" in refused and "not a finite number" in refused
    assert step.logic.dumps(state) == step.logic.dumps(step.logic.new_state())


def test_max_future_is_a_duration_in_the_spec():
    spec = parse_spec({**FRAUD, "source": {**FRAUD["source"], "max_future": "1h"}})
    assert spec.max_future_ms == 3_600_000 and parse_spec(FRAUD).max_future_ms == DEFAULT_MAX_FUTURE_MS
    assert spec.spec_hash != parse_spec(FRAUD).spec_hash
    with pytest.raises(SpecError, match="source.max_future"):
        parse_spec({**FRAUD, "source": {**FRAUD["source"], "max_future": "soon"}})
