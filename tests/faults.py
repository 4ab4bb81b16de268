"""Helpers of the fault tests: the live stream a fault falls into, and the checker (deploy/checker.py),
asserted: after a fault and the recovery, each event of the source has exactly one features row and
one prediction (read_committed), the rows equal an uninterrupted run's, and the DLQ holds exactly what
was injected as bad."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

from tests.kafka_helpers import read_committed


class _Trap:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_trap(marker: Path) -> bytes:
    """Pickled bytes that create `marker` when anything unpickles them: poison that shows if it was eaten."""
    return pickle.dumps(_Trap(marker))


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


def check_scores(kafka, spec, model_dir, key, rows: dict[str, dict], at_least_once: bool = False) -> int:
    """Each features row (`rows`: event id -> row) has exactly one prediction (at least once: one or more,
    the same record but for the scoring time and the score's float32 rounding), by the model saved in `model_dir` (verified with
    `key`), whose score is that model's score of the row's features: so the split and the fused stages,
    each held to this, give the same predictions. Returns how many predictions there are."""
    import numpy as np
    import orjson

    from models.artifacts import load_artifact

    model = load_artifact(model_dir, key, spec.spec_hash, None)
    predictions = [orjson.loads(m.value()) for m in read_committed(kafka, spec.topics.predictions, len(rows),
                                                                   timeout_s=120, idle_s=2.0)]
    ids, total = [p["event_id"] for p in predictions], len(predictions)
    assert set(ids) == set(rows), ("a prediction lost", sorted(set(rows) - set(ids))[:5])
    if at_least_once:
        first: dict[str, dict] = {}
        for p in predictions:  # a second one scored in a batch of another size: the score to float32 rounding
            same = {k: v for k, v in p.items() if k not in ("scored_at", "score")}
            held = first.setdefault(p["event_id"], {**same, "score": p["score"]})
            assert {k: v for k, v in held.items() if k != "score"} == same, ("a second prediction differs", p, held)
            assert np.isclose(held["score"], p["score"], rtol=1e-5, atol=1e-7), ("a second score differs", p, held)
        predictions = [{**p, "scored_at": None} for p in first.values()]
        ids = list(first)
    else:
        assert len(ids) == len(set(ids)), ("a prediction doubled", len(ids) - len(set(ids)))
    assert {p["model_version"] for p in predictions} == {model.version}
    want = model.score([rows[i]["features"] for i in ids])
    got = np.array([np.nan if p["score"] is None else p["score"] for p in predictions], dtype=np.float32)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True), float(np.nanmax(np.abs(got - want)))
    return total
