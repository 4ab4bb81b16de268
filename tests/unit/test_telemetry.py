"""A stage's metrics over real HTTP: the catalogue's names and labels, counters from 0, a batch's
latencies in the right buckets, the serving version's info series alone, /ready, the file_sd target,
and an exposition promtool accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.telemetry import MetricsServer, StageMetrics
from tests.stack_helpers import fetch


class Msg:
    def __init__(self, topic: str, partition: int) -> None:
        self._t, self._p = topic, partition

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = fetch(url)[1].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_stage_serves_the_catalogues_metrics(tmp_path):
    ready = {"now": False}
    metrics = StageMetrics("fraud", "scorer")
    server = MetricsServer(metrics, "scorer-0", ready=lambda: ready["now"], targets_dir=tmp_path / "targets")
    try:
        metrics.consumed([Msg("features", 0)] * 3 + [Msg("features", 2)])
        metrics.produced("predictions", 4)
        metrics.refuse("unreadable_features")
        metrics.batch(4, 0.002, 0.01)
        metrics.latencies(10_000, [9_990, 9_900, 8_000, 0])  # 10 ms, 100 ms, 2 s; 0: no timestamp
        metrics.serving("v1", "cpu")
        metrics.serving("v2", "cpu")
        metrics.model_call(4096, 0.001)
        got = scrape(server.url)

        def at(name: str, **labels: str) -> float:
            return got[(name, tuple(sorted({"pipeline": "fraud", "stage": "scorer", **labels}.items())))]

        common = (("pipeline", "fraud"), ("stage", "scorer"))
        assert at("eddy_records_in_total", topic="features", partition="0") == 3
        assert at("eddy_records_in_total", topic="features", partition="2") == 1
        assert at("eddy_records_out_total", topic="predictions") == 4
        assert at("eddy_records_refused_total", reason="unreadable_features") == 1
        assert at("eddy_records_refused_total", reason="schema") == 0
        assert at("eddy_duplicates_total") == 0  # from 0, so increase() sees the first one
        bucket = {dict(labels)["le"]: v for (name, labels), v in got.items() if name == "eddy_latency_seconds_bucket"}
        assert (bucket["0.01"], bucket["0.1"], bucket["1.0"], bucket["2.5"], bucket["+Inf"]) == (1, 2, 2, 3, 3)
        assert got[("eddy_latency_seconds_sum", common)] == pytest.approx(2.11)
        versions = {dict(labels)["version"] for (name, labels) in got if name == "eddy_model_info"}
        assert versions == {"v2"} and got[("eddy_model_swaps_total", common)] == 1
        assert got[("eddy_scored_rows_total", common)] == 4096
        assert any(name == "process_resident_memory_bytes" for name, _ in got)
        with pytest.raises(urllib.error.HTTPError, match="503") as refused:
            fetch(server.url.replace("/metrics", "/ready"))
        refused.value.close()
        ready["now"] = True
        assert fetch(server.url.replace("/metrics", "/ready"))[0] == 200
        [target] = json.loads((tmp_path / "targets" / "scorer-0.json").read_text())
        assert target == {"targets": [f"127.0.0.1:{server.port}"],
                          "labels": {"job": "eddy-scorer", "pipeline": "fraud", "part": "scorer-0"}}
        if shutil.which("promtool"):
            text = fetch(server.url)[1]
            check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
            assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()
    finally:
        server.close()
    assert not (tmp_path / "targets" / "scorer-0.json").exists()


def test_a_stage_that_cannot_reach_kafka_is_not_ready(tmp_path):
    from deploy.components import kafka_reachable
    from deploy.processes import free_port
    from deploy.settings import load_settings

    settings = load_settings(environ={"EDDY_HOME": str(tmp_path), "EDDY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    assert kafka_reachable(settings)() is False
