"""Figures that reach their reader through Redis from several replicas, on a real redis-server: the Flink
job's subtask counts mirrored into the job process's Prometheus metrics, and the scorers' drift windows
merged for `eddy drift`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from features.spec import load_spec
from features.waiting import poll

pytestmark = [pytest.mark.redis]
SPEC = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "fraud.yaml")


def samples(metrics) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_flink_subtasks_counts_reach_the_job_process_metrics(redis_settings):
    from deploy.components import mirror_flink_counts
    from streams.metrics import Heartbeat
    from streams.stores import redis_client
    from streams.telemetry import StageMetrics

    client = redis_client(redis_settings.redis_url)
    beats = []
    for replica, counts in (("0", {"valid": 70, "dlq": 3, "duplicates": 2, "refused_schema": 2, "refused_not_json": 1}),
                            ("1", {"valid": 30, "dlq": 1, "duplicates": 0, "refused_future_time": 1})):
        beat = Heartbeat(client, SPEC.name, "features")
        beat.field = replica
        beat.beat(sum(counts.values()), force=True, engine="flink", **counts)
        beats.append(beat)
    metrics = StageMetrics(SPEC.name, "features")
    threading.Thread(target=mirror_flink_counts, args=(redis_settings, SPEC, metrics, 0.05), daemon=True).start()
    common = (("pipeline", SPEC.name), ("stage", "features"))

    def value(name: str, **labels: str) -> float | None:
        return samples(metrics).get((name, tuple(sorted((*common, *labels.items())))))

    assert poll(lambda: value("eddy_records_out_total", topic=SPEC.topics.features) == 100, 10, every_s=0.05)
    assert value("eddy_records_in_total", topic=SPEC.topics.source, partition="all") == 106
    assert value("eddy_duplicates_total") == 2
    assert value("eddy_records_refused_total", reason="schema") == 2
    assert value("eddy_records_refused_total", reason="not_json") == 1
    assert value("eddy_records_refused_total", reason="future_time") == 1
    beats[1].beat(60, force=True, engine="flink", valid=55, dlq=1, duplicates=0, refused_future_time=1)
    assert poll(lambda: value("eddy_records_out_total", topic=SPEC.topics.features) == 125, 10, every_s=0.05)


def test_the_scorers_windows_merge_into_one_count_per_bin(redis_settings):
    from models.drift import DriftWindow, merged_snapshot, publish_snapshot, reference
    from streams.stores import redis_client

    client = redis_client(redis_settings.redis_url)
    client.delete(f"eddy:{SPEC.name}:drift")
    names = SPEC.model_inputs
    rng = np.random.default_rng(5)
    ref = reference(rng.random((2000, len(names))), names, rng.random(2000))
    both = DriftWindow(ref, names, "v1", 3000)
    for replica, n in ((0, 1000), (1, 1500)):
        values, scores = rng.random((n, len(names))) ** (1 + replica), rng.random(n)
        window = DriftWindow(ref, names, "v1", 3000)
        window.add(values, scores)
        both.add(values, scores)
        publish_snapshot(client, SPEC.name, replica, window.snapshot())
    stale = DriftWindow(ref, names, "v0", 3000).snapshot()
    publish_snapshot(client, SPEC.name, 2, {**stale, "at": time.time() - 3600})  # a replica gone an hour ago
    merged, expected = merged_snapshot(client, SPEC.name), both.snapshot()
    assert merged is not None and merged["replicas"] == 2 and merged["rows"] == 2500
    assert merged["features"] == expected["features"] and merged["score"] == expected["score"]
    assert merged_snapshot(client, SPEC.name, version="v0") is None
