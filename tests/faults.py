"""Helpers of the fault tests: the live stream a fault falls into, and the checker (deploy/checker.py),
asserted: after a fault and the recovery, each event of the source has exactly one features row and
one prediction (read_committed), the rows equal an uninterrupted run's, and the DLQ holds exactly what
was injected as bad."""

from __future__ import annotations

import pickle
import subprocess
import time
from pathlib import Path

from tests.kafka_helpers import read_committed
from tests.stack_helpers import group_lag, wait_for

BACKLOG, RATE, LIVE = 5_000, 1_000, 8_000   # the live stream lasts 8 s; the fault falls inside it


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


def during_a_live_stream(env, settings, spec, fault, seed: int = 4, before: int = BACKLOG) -> float:
    """Start a live stream (on `before` source records), inject `fault` once it flows, wait for it to end
    and every stage to catch up; returns the seconds from the fault's start to lag 0 on every group."""
    from tests.conftest import EDDY, REPO

    live = live_producer(EDDY, env, REPO, RATE, LIVE, seed=seed)
    wait_for(lambda: source_records(settings.kafka, spec.topics.source) > before + 500 or live.poll() is not None,
             60, "the live stream")
    assert live.poll() is None, "the live stream ended before the fault"
    started = time.monotonic()
    fault()
    _, errors = live.communicate(timeout=180)
    assert live.returncode == 0, errors
    caught_up(env, spec, 300)
    return time.monotonic() - started


def caught_up(env, spec, timeout_s: float) -> None:
    """Wait until every stage's consumer group is at lag 0."""
    for stage, topic in (("features", spec.topics.source), ("scorer", spec.topics.features),
                         ("online-writer", spec.topics.features)):
        group = spec.stage_id(stage)
        wait_for(lambda g=group, t=topic: group_lag(env, g, t) == 0, timeout_s, f"{stage} to catch up")
