"""The exactly-once checker, shared by `eddy chaos` and the fault tests.

It reads the stack's topics from the beginning as a read_committed consumer once every stage has caught
up, and holds the outputs to what an uninterrupted run computes: every valid event of the source has
exactly one features row, equal to the shared Featurizer's over each partition in offset order, and
exactly one prediction; every record validation refuses has one dead letter, and nothing else does.
The topics must hold their whole history (a fresh stack, no retention deletes yet)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from features.spec import PipelineSpec
from streams.kafka import KafkaConfig, json_object, read_topic

EXAMPLES = 5  # event ids kept per kind of failure, to start the search from


def expected_rows(spec: PipelineSpec, source: list) -> tuple[dict[str, dict], int]:
    """What an uninterrupted run computes from the source's records: {event id: features row} of each
    first-seen valid event, and how many records are refused (each is a dead letter)."""
    from features.apply import Refused
    from features.validation import Invalid, Validator
    from streams.featurize import Featurizer

    by_partition = defaultdict(list)
    for msg in source:
        by_partition[msg.partition()].append(msg)
    featurize, validator, refused = Featurizer(spec), Validator(spec), 0
    states: dict[str, Any] = {}
    seen: set[str] = set()
    rows: dict[str, dict] = {}
    for msgs in by_partition.values():
        for msg in sorted(msgs, key=lambda m: m.offset()):
            event = validator.parse(msg.value())
            if isinstance(event, Invalid):
                refused += 1
                continue
            if event.event_id in seen:  # a duplicate: the engines drop it, and count it
                continue
            seen.add(event.event_id)
            new_state, value = featurize.apply_bytes(states.get(event.key), event, msg.timestamp()[1])
            if isinstance(value, Refused):  # e.g. stamped too far ahead: a dead letter
                refused += 1
                continue
            if new_state is not None:
                states[event.key] = new_state
            rows[event.event_id] = orjson.loads(value)
    return rows, refused


@dataclass
class Verdict:
    """What the checker found. `ok` when nothing was lost, doubled, wrong or unexpected."""

    events: int = 0                  # valid events in the source
    refused: int = 0                 # source records validation refuses
    features_rows: int = 0
    lost: int = 0                    # valid events without a features row
    duplicated: int = 0              # features rows beyond the first of an event
    wrong: int = 0                   # rows that differ from an uninterrupted run's
    unexpected: int = 0              # rows of no valid event of the source
    predictions: int = 0
    predictions_lost: int = 0
    predictions_duplicated: int = 0
    dead_letters: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong or self.unexpected or self.predictions_lost
                    or self.predictions_duplicated or self.dead_letters != self.refused)

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        return (f"{self.events:,} events: {self.lost} lost, {self.duplicated} duplicated, {self.wrong} wrong, "
                f"{self.unexpected} unexpected features rows; predictions {self.predictions_lost} lost, "
                f"{self.predictions_duplicated} duplicated; {self.dead_letters} dead letters for "
                f"{self.refused} refused records")


def check(kafka: KafkaConfig, spec: PipelineSpec, timeout_s: float = 600.0) -> Verdict:
    """Read the source, features, predictions and DLQ topics whole and hold them to an uninterrupted
    run (see the module's docstring). Call it once every stage has caught up."""
    topics = spec.topics
    source = read_topic(kafka, topics.source, timeout_s=timeout_s)
    want, refused = expected_rows(spec, source)
    verdict = Verdict(events=len(want), refused=refused)
    del source

    rows = read_topic(kafka, topics.features, timeout_s=timeout_s)
    verdict.features_rows = len(rows)
    seen: Counter[Any] = Counter()
    for msg in rows:
        row = json_object(msg.value())
        event_id = row.get("event_id")
        seen[event_id] += 1
        if event_id not in want:
            verdict.unexpected += 1
            _example(verdict, "unexpected", event_id)
        elif seen[event_id] == 1 and row != want[event_id]:
            verdict.wrong += 1
            _example(verdict, "wrong", event_id)
    del rows
    doubled = {e: n - 1 for e, n in seen.items() if n > 1 and e in want}
    verdict.duplicated = sum(doubled.values())
    _examples(verdict, "duplicated", list(doubled))
    missing = [e for e in want if e not in seen]
    verdict.lost = len(missing)
    _examples(verdict, "lost", missing)

    scored = Counter(json_object(m.value()).get("event_id")
                     for m in read_topic(kafka, topics.predictions, timeout_s=timeout_s))
    verdict.predictions = sum(scored.values())
    verdict.predictions_duplicated = sum(n - 1 for e, n in scored.items() if n > 1 and e in want)
    unscored = [e for e in want if e not in scored]
    verdict.predictions_lost = len(unscored)
    _examples(verdict, "predictions lost", unscored)
    verdict.dead_letters = len(read_topic(kafka, topics.dlq, timeout_s=timeout_s))
    return verdict


def _example(verdict: Verdict, kind: str, event_id: Any) -> None:
    kept = verdict.examples.setdefault(kind, [])
    if len(kept) < EXAMPLES:
        kept.append(str(event_id))


def _examples(verdict: Verdict, kind: str, event_ids: list) -> None:
    for event_id in event_ids[:EXAMPLES]:
        _example(verdict, kind, event_id)
