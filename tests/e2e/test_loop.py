"""The whole loop on a small stream: `eddy up` with lakehouse ingestion, labelled history, `eddy retrain`
from the lakehouse registers and publishes a version, the scorer serves it, and `eddy models` shows
live metrics that a recomputation from the Delta tables (delta-rs + numpy here) matches; the lakehouse
stage exports the same live figures, the holdout's and each table's freshness as Prometheus gauges, and
samples the scorers' drift window into gold.drift."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_eddy, stack_environment
from tests.monitoring.test_dashboards import unanswered_panels
from tests.stack_helpers import fetch, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.spark, pytest.mark.slow]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision written independently of models.training: precision at each positive, by
    rank, with tied scores counted as one threshold."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    total, found, ap = y.sum(), 0, 0.0
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        gained = int(y[i:j + 1].sum())
        found += gained
        ap += gained / total * (found / (j + 1))
        i = j + 1
    return ap


def delta(lake: str, path: str, columns: list[str] | None):
    from lakehouse.snapshot import read_snapshot

    return read_snapshot(f"{lake}/{path}", columns=columns).to_pandas()


def test_retrain_registers_publishes_serves_and_live_metrics_match_the_tables(tmp_path):
    env = {**stack_environment(tmp_path / "home"), "EDDY_STAGES": "fused", "EDDY_INGEST": "on",
           "EDDY_INGEST_TRIGGER": "1s",
           "EDDY_MONITOR_EVERY": "2s"}
    lake = str(tmp_path / "home" / "lakehouse")
    try:
        up = run_eddy(["up", "--monitoring"], env, timeout=300)
        assert up.returncode == 0, up.stderr
        assert "lakehouse" in up.stdout
        produced = run_eddy(["produce", "--count", "12000", "--backfill", "12h", "--label-delay", "0",
                             "--seed", "5", "--fraud-rate", "0.03"], env)
        assert produced.returncode == 0, produced.stderr

        def rows(path: str) -> int:
            try:
                return len(delta(lake, path, ["kafka_offset"]))
            except Exception:  # noqa: BLE001 - the table may not exist yet
                return 0
        wait_for(lambda: rows("silver/features") >= 12000 and rows("bronze/labels") >= 12000
                 and rows("gold/predictions") >= 12000, 300, "history in the lakehouse")

        retrained = run_eddy(["retrain", "--publish", "always", "--epochs", "4"], env, timeout=600)
        assert retrained.returncode == 0, retrained.stderr
        assert "trained v" in retrained.stdout and "on 12,000 labelled rows" in retrained.stdout
        registry = delta(lake, "gold/models", None)
        assert len(registry) == 1
        version = registry["version"].iloc[0]
        assert registry["parent"].iloc[0] == "baseline-1" and bool(registry["published"].iloc[0])
        assert len(registry["sha256"].iloc[0]) == 64
        assert json.loads(registry["metrics"].iloc[0])["holdout"]["train_rows"] == 9600

        def serving() -> str | None:
            status = json.loads(run_eddy(["status", "--json"], env).stdout)
            return status["parts"]["features-fused"].get("model_version")  # the fused stage scores
        wait_for(lambda: serving() == version, 120, f"the scorer to serve {version}")

        more = run_eddy(["produce", "--count", "3000", "--label-delay", "0", "--seed", "6", "--fraud-rate", "0.05", "--compressed"], env)
        assert more.returncode == 0, more.stderr

        def scored_by_new() -> int:
            try:
                return int((delta(lake, "gold/predictions", ["model_version"])["model_version"] == version).sum())
            except Exception:  # noqa: BLE001
                return 0
        wait_for(lambda: scored_by_new() > 0 and rows("bronze/labels") >= 15000
                 and rows("gold/predictions") >= 15000, 300, "predictions of the new version in the lakehouse")

        listed = run_eddy(["models", "--json"], env)
        assert listed.returncode == 0, listed.stderr
        models = {m["version"]: m for m in json.loads(listed.stdout)}
        assert models[version]["serving"] and models[version]["registered"]

        # Recompute from the tables: first prediction per event (Kafka order), newest label per event.
        predictions = delta(lake, "gold/predictions", ["event_id", "model_version", "score", "kafka_partition",
                                                       "kafka_offset"])
        labels = delta(lake, "bronze/labels", ["event_id", "is_fraud", "label_time", "kafka_timestamp"])
        predictions = predictions.sort_values(["kafka_partition", "kafka_offset"]).drop_duplicates("event_id")
        labels = labels.sort_values(["label_time", "kafka_timestamp"]).drop_duplicates("event_id", keep="last")
        joined = predictions.merge(labels, on="event_id")
        checked = 0
        expected: dict[str, tuple[int, float | None]] = {}
        for name, group in joined.groupby("model_version"):
            live = models[name]["live"]
            y = group["is_fraud"].to_numpy().astype(int)
            assert live["labelled"] == len(group) and live["positives"] == int(y.sum())
            expected[name] = (len(group), average_precision(group["score"].to_numpy(), y) if y.sum() else None)
            if y.sum():
                assert live["pr_auc"] == pytest.approx(expected[name][1], abs=1e-9)
                checked += 1
        assert checked >= 1 and set(joined["model_version"]) >= {"baseline-1"}

        # The lakehouse stage's gauges say the same (sampled every EDDY_MONITOR_EVERY, so wait for one).
        url = json.loads(run_eddy(["status", "--json"], env).stdout)["parts"]["lakehouse"]["metrics_url"]

        def gauges() -> dict[tuple[str, str], float]:
            _, body = fetch(url)
            return {(s.name, s.labels.get("version") or s.labels.get("table", "")): s.value
                    for family in text_string_to_metric_families(body.decode()) for s in family.samples
                    if s.name.startswith(("eddy_live_", "eddy_holdout_", "eddy_lakehouse_freshness"))}

        wait_for(lambda: all(gauges().get(("eddy_live_labelled", v)) == n for v, (n, _) in expected.items()), 60,
                 "the live gauges on the final tables")
        seen = gauges()
        for name, (_, ap) in expected.items():
            if ap is not None:
                assert seen[("eddy_live_pr_auc", name)] == pytest.approx(ap, abs=1e-9)
        holdout = json.loads(registry["metrics"].iloc[0])["holdout"]["pr_auc"]
        assert seen[("eddy_holdout_pr_auc", version)] == pytest.approx(holdout, abs=1e-12)
        assert {t for (n, t) in seen if n == "eddy_lakehouse_freshness_seconds"} >= {
            "bronze.transactions", "bronze.labels", "silver.features", "gold.predictions"}
        assert all(v >= 0 for (n, _), v in seen.items() if n == "eddy_lakehouse_freshness_seconds")

        def drift_rows():
            try:
                return delta(lake, "gold/drift", ["version", "kind", "feature", "psi", "rows"])
            except Exception:  # noqa: BLE001 - the table may not exist yet
                return None
        wait_for(lambda: (d := drift_rows()) is not None and (d["version"] == version).any(), 60,
                 "the new version's drift in gold.drift")
        drift = drift_rows()
        mine = drift[(drift["version"] == version) & (drift["kind"] == "feature")]
        from features.spec import load_spec
        assert set(mine["feature"]) == set(load_spec(env["EDDY_PIPELINE"]).model_inputs)
        assert mine["psi"].notna().all() and (mine["rows"] > 0).all()
        assert len(drift[(drift["version"] == version) & (drift["kind"] == "score")]) >= 1
        # the model and infrastructure dashboards' live-quality and freshness panels have data now
        prometheus = json.loads(run_eddy(["status", "--json"], env).stdout)["parts"]["prometheus"]["metrics_url"]
        assert unanswered_panels(prometheus.removesuffix("/metrics"),
                                 ("eddy_live_pr_auc", "eddy_live_precision", "eddy_live_calibration_error",
                                  "eddy_holdout_pr_auc", "eddy_live_labelled", "eddy_lakehouse_freshness_seconds"),
                                 "fraud") == []
    finally:
        run_eddy(["down"], env, timeout=120)
