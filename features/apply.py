"""The one step that applies an admitted event to its entity's state: the feature row, or the reason
the event goes to the DLQ instead. Every engine (Faust, Flink, native) and the Spark backfill call it,
so they refuse the same events for the same reasons and compute the same rows for the rest."""

from __future__ import annotations

from typing import final

from features.spec import PipelineSpec
from features.validation import Event, iso_ms
from features.windows import EntityState, FeatureLogic, FeatureRow


@final  # so `type(row) is Refused` narrows the other branch to FeatureRow
class Refused(str):
    """Why an admitted event does not enter its entity's state: the DLQ's eddy.error header."""


class ApplyStep:
    """apply() is the whole per-event decision; an engine only keeps the states it returns rows for."""

    __slots__ = ("logic", "max_future_ms")

    def __init__(self, spec: PipelineSpec) -> None:
        self.logic = FeatureLogic(spec)
        self.max_future_ms = spec.max_future_ms

    def apply(self, state: EntityState, event: Event, arrival_ms: int | None) -> FeatureRow | Refused:
        """The event's feature row, computed on `state` (changed in place unless the row is late), or
        Refused with `state` untouched. `arrival_ms` is the record's Kafka timestamp (None when the
        record has none): an event time more than the spec's source.max_future ahead of it is refused,
        so one event stamped hours ahead cannot make its entity's real events late. The rule reads
        only the record, so a replay after a crash decides as the first run did."""
        t = event.event_time_ms
        if arrival_ms is not None and t - arrival_ms > self.max_future_ms:
            return Refused(f"event time {iso_ms(t)} is {(t - arrival_ms) / 1000:.3f}s ahead of the record's "
                           f"Kafka timestamp {iso_ms(arrival_ms)} (source.max_future is "
                           f"{self.max_future_ms / 1000:g}s)")
        try:
            return self.logic.update(state, t, event.values)
        except ValueError as exc:  # a value the aggregations cannot take: the record's fault
            return Refused(str(exc))

