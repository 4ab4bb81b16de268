"""Helpers of the fault tests: the live stream a fault falls into, and the checker (deploy/checker.py),
asserted: after a fault and the recovery, each event of the source has exactly one features row and
one prediction (read_committed), the rows equal an uninterrupted run's, and the DLQ holds exactly what
was injected as bad."""

from __future__ import annotations

import subprocess

from tests.kafka_helpers import read_committed


def source_records(kafka, topic: str) -> int:
    """How many records the topic holds (its partitions' end offsets)."""
    from confluent_kafka import Consumer, TopicPartition

    probe = Consumer(kafka.client(**{"group.id": "test-probe", "enable.auto.commit": False}))
    try:
        partitions = probe.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)
    finally:
        probe.close()


def expected_rows(kafka, spec, events: int) -> dict[str, dict]:
    """What an uninterrupted run computes: the shared Featurizer over each partition in offset order."""
    from deploy.checker import expected_rows as computed

    rows, _ = computed(spec, read_committed(kafka, spec.topics.source, events))
    return rows


def check_exactly_once(kafka, spec, events: int, dead_letters: int = 0) -> None:
    """The fault matrix's checker (deploy/checker.py) over the stack's topics, asserted."""
    from deploy.checker import check

    verdict = check(kafka, spec)
    assert verdict.ok, (verdict.summary(), verdict.examples)
    assert (verdict.events, verdict.dead_letters) == (events, dead_letters), verdict.summary()


def live_producer(eddy: list[str], env: dict, cwd, rate: int, count: int, seed: int) -> subprocess.Popen:
    """`eddy produce` at a fixed rate in the background, for a fault that falls in a live stream."""
    import os

    return subprocess.Popen([*eddy, "produce", "--rate", str(rate), "--count", str(count), "--seed", str(seed),
                             "--label-delay", "0"], env={**os.environ, **env}, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
