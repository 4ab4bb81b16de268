"""The per-event step the engines share around features.apply: the state bytes an engine stores, the
features record it produces, and the dead letter of an event the apply step refuses."""

from __future__ import annotations

import orjson

from features.apply import ApplyStep, Refused
from features.spec import PipelineSpec
from features.validation import Event, iso_ms
from features.windows import FeatureRow


def feature_message(spec: PipelineSpec, event: Event, row: FeatureRow) -> bytes:
    """The features-topic value (docs/contract.md, "features")."""
    return orjson.dumps({
        "event_id": event.event_id,
        spec.key: event.key,
        "event_time": iso_ms(event.event_time_ms),
        "features": row.features,
        "late": row.late,
    })


def arrival_ms(msg) -> int | None:
    """The epoch ms of a consumed record's Kafka timestamp (confluent-kafka's (type, ms) pair), or None."""
    kind, ms = msg.timestamp()
    return ms if kind and ms >= 0 else None


class Featurizer:
    """The apply step with the engines' encodings. An engine that keeps live state objects calls
    step.apply() itself and message() for the value; one that stores bytes calls apply_bytes()."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.step = ApplyStep(spec)
        self.logic = self.step.logic

    def apply_bytes(self, state: bytes | None, event: Event,
                    arrival: int | None) -> tuple[bytes | None, bytes | Refused]:
        """(state bytes to store, or None when unchanged; the features value, or why the event is
        refused and goes to the DLQ)."""
        logic = self.logic
        current = logic.loads(state) if state else logic.new_state()
        row = self.step.apply(current, event, arrival)
        if isinstance(row, Refused):
            return None, row
        return (None if row.late else logic.dumps(current)), self.message(event, row)

    def message(self, event: Event, row: FeatureRow) -> bytes:
        """The features value of an event whose row the engine computed on its own live state."""
        return feature_message(self.spec, event, row)
