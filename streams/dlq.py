"""Dead letters: a refused record goes to the spec's DLQ topic byte for byte, its reason in headers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What to produce to the DLQ for one refused record (the producer is the caller's, so it can be
    transactional with the rest of the batch)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter(dlq_topic: str, msg, reason: str, stage: str) -> DeadLetter:
    """The DLQ record for a consumed confluent-kafka Message: original key and value unchanged."""
    headers = list(msg.headers() or [])
    headers += [
        ("eddy.error", reason.encode("utf-8", "replace")),
        ("eddy.stage", stage.encode()),
        ("eddy.source.topic", msg.topic().encode()),
        ("eddy.source.partition", str(msg.partition()).encode()),
        ("eddy.source.offset", str(msg.offset()).encode()),
    ]
    return DeadLetter(dlq_topic, msg.key(), msg.value(), headers)
