"""The per-event step both engines share: stored state + a valid event -> new state + a features record.

Engines keep the state as opaque bytes (a Faust table, Flink keyed state); everything about what the
bytes mean and what the features record looks like lives here, so both engines give the same numbers."""

from __future__ import annotations

import orjson

from features.spec import PipelineSpec
from features.windows import FeatureLogic, FeatureRow
from streams.validation import Event, iso_ms


def feature_message(spec: PipelineSpec, event: Event, row: FeatureRow) -> bytes:
    """The features-topic value of CONTRACT section 4."""
    return orjson.dumps({
        "event_id": event.event_id,
        spec.key: event.key,
        "event_time": iso_ms(event.event_time_ms),
        "features": row.features,
        "late": row.late,
    })


class Featurizer:
    """apply() is the whole per-event computation; the engine only stores the returned state bytes.
    An engine that keeps live state objects calls logic.update() itself and message() for the value."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.logic = FeatureLogic(spec)

    def apply(self, state: bytes | None, event: Event) -> tuple[bytes | None, bytes]:
        """(state bytes to store, or None when unchanged because the event was late; features value)."""
        logic = self.logic
        current = logic.loads(state) if state else logic.new_state()
        row = logic.update(current, event.event_time_ms, event.values)
        return (None if row.late else logic.dumps(current)), self.message(event, row)

    def message(self, event: Event, row: FeatureRow) -> bytes:
        """The features value of an event whose row the engine computed on its own live state."""
        return feature_message(self.spec, event, row)
