"""The checker of every fault test: after a fault and the recovery, each event of the source has
exactly one features row and one prediction (read_committed), the rows equal an uninterrupted run's
(the shared apply step over each partition in offset order), and the DLQ holds exactly what was
injected as bad."""

from __future__ import annotations

import subprocess
from collections import defaultdict

import orjson

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
    from features.validation import Validator
    from streams.featurize import Featurizer

    source = read_committed(kafka, spec.topics.source, events)
    by_partition = defaultdict(list)
    for msg in source:
        by_partition[msg.partition()].append(msg)
    featurize, validator, states, rows = Featurizer(spec), Validator(spec), {}, {}
    for msgs in by_partition.values():
        for msg in sorted(msgs, key=lambda m: m.offset()):
            event = validator.parse(msg.value())
            new_state, value = featurize.apply_bytes(states.get(event.key), event, msg.timestamp()[1])
            if new_state is not None:
                states[event.key] = new_state
            rows[event.event_id] = orjson.loads(value)
    return rows


def check_exactly_once(kafka, spec, events: int, dead_letters: int = 0, predictions: bool = True) -> None:
    """The fault matrix's checker (see the module's docstring)."""
    want = expected_rows(kafka, spec, events)
    rows = [orjson.loads(m.value()) for m in read_committed(kafka, spec.topics.features, events, timeout_s=180,
                                                            idle_s=3.0)]
    ids = [r["event_id"] for r in rows]
    assert len(ids) == len(set(ids)) == events, ("features rows lost or doubled", len(ids), len(set(ids)),
                                                 sorted(set(want) - set(ids))[:5])
    assert {r["event_id"]: r for r in rows} == want, "a row differs from an uninterrupted run's"
    if predictions:
        scored = [orjson.loads(m.value())["event_id"]
                  for m in read_committed(kafka, spec.topics.predictions, events, timeout_s=180, idle_s=3.0)]
        assert len(scored) == len(set(scored)) == events, ("predictions lost or doubled", len(scored), len(set(scored)))
    letters = read_committed(kafka, spec.topics.dlq, 10**9, timeout_s=3)
    assert len(letters) == dead_letters, [dict(m.headers() or []).get("eddy.error") for m in letters][:5]


def live_producer(eddy: list[str], env: dict, cwd, rate: int, count: int, seed: int) -> subprocess.Popen:
    """`eddy produce` at a fixed rate in the background, for a fault that falls in a live stream."""
    import os

    return subprocess.Popen([*eddy, "produce", "--rate", str(rate), "--count", str(count), "--seed", str(seed),
                             "--label-delay", "0"], env={**os.environ, **env}, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
