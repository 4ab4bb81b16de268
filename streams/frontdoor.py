"""The front door of every engine: validate a batch, dead-letter what is refused, drop duplicates."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass, field

from features.spec import PipelineSpec
from features.validation import Event, Invalid, Validator
from streams.dedupe import Deduper
from streams.dlq import dead_letter
from streams.kafka import Record
from streams.loop import Output
from streams.telemetry import refusal_reason


@dataclass
class FrontDoorCounts:
    """Records the front door has handled since it was made: admitted (valid), dead-lettered
    (invalid) and dropped as duplicates."""

    valid: int = 0
    invalid: int = 0
    duplicates: int = 0
    refused: Tally = field(default_factory=Tally)  # dead letters by reason class (streams.telemetry)


class FrontDoor:
    """admit() turns a consumed batch into the events that go on; never raises on a bad record."""

    def __init__(self, spec: PipelineSpec, deduper: Deduper | None, stage: str = "validate") -> None:
        self.validator = Validator(spec)
        self.deduper = deduper
        self.dlq_topic = spec.topics.dlq
        self.stage = stage
        self.counts = FrontDoorCounts()

    def admit(self, messages: Sequence[Record], out: Output) -> list[tuple[Record, Event]]:
        """(message, event) for each valid first-seen record, in batch order; refused ones to the DLQ."""
        admitted = []
        parse = self.validator.parse
        for msg in messages:
            result = parse(msg.value())
            if isinstance(result, Invalid):
                letter = dead_letter(self.dlq_topic, msg, str(result), self.stage)
                out.produce(letter.topic, letter.value, letter.key, headers=letter.headers)
                self.counts.invalid += 1
                self.counts.refused[refusal_reason(result)] += 1
            else:
                admitted.append((msg, result))
        if self.deduper is not None and admitted:
            first = self.deduper.first_seen(
                [(e.event_id, f"{m.topic()}:{m.partition()}:{m.offset()}") for m, e in admitted]
            )
            self.counts.duplicates += len(first) - sum(first)
            admitted = [pair for pair, keep in zip(admitted, first, strict=True) if keep]
        self.counts.valid += len(admitted)
        return admitted
