"""Drift on a real stack (`eddy up --monitoring`, native engine): a model retrained on the stream
records its reference; the same stream continuing keeps every feature's PSI low; the same cards with
every amount ten times larger push the amount features above the bound, fire EddyFeatureDrift in
Prometheus for them only, and leave the other features below it. `eddy drift` and the Prometheus
gauges give the same figures, both merged over the scorers' windows in Redis."""

from __future__ import annotations

import json
import time

import pytest

from deploy.prometheus_local import query
from features.waiting import poll
from tests.conftest import run_eddy, stack_environment
from tests.kafka_helpers import count_committed
from tests.monitoring.test_dashboards import unanswered_panels
from tests.stack_helpers import status, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]
HOUR_MS = 3_600_000
TRAIN, CALM, SHIFTED = 12_000, 3_000, 3_000
WINDOW = 2_500           # the scorers' window: smaller than each later segment, so it holds that segment only
AMOUNT_FEATURES = {"amount_sum_1h", "amount_avg_24h"}


def drift_after(env: dict[str, str], since: float, version: str) -> dict | None:
    """`eddy drift --json` once it reports a full window of `version` measured after `since`."""
    answer = run_eddy(["drift", "--json"], env)
    assert answer.returncode == 0, answer.stderr
    figures = json.loads(answer.stdout)
    if figures and figures["version"] == version and figures["at"] > since and figures["rows"] == WINDOW:
        return figures
    return None


def summary(figures: dict) -> str:
    psi = ", ".join(f"{name} {f['psi']:.3f}" for name, f in figures["features"].items())
    return f"PSI {psi}; score {figures['score_psi']:.3f} over {figures['rows']} rows"


def test_a_shifted_amount_drifts_fires_the_alert_and_the_other_features_stay_below(tmp_path):
    from deploy.settings import load_settings
    from features.spec import load_spec
    from models.drift import DRIFT_BOUND
    from models.retrain import retrain
    from streams.generator import GeneratorConfig, TransactionGenerator
    from streams.producer import SyntheticProducer

    env = {**stack_environment(tmp_path / "home"), "EDDY_ENGINE": "native", "EDDY_STAGES": "split", "EDDY_DRIFT_WINDOW": str(WINDOW),
           "EDDY_ALERT_FOR": "10s"}
    settings = load_settings(environ=env)
    spec = load_spec(settings.pipeline)
    try:
        up = run_eddy(["up", "--monitoring"], env)
        assert up.returncode == 0, up.stderr
        settings = load_settings(environ=env)  # signed in: `eddy up` made the stack's credentials
        prometheus = status(env)["parts"]["prometheus"]["metrics_url"].removesuffix("/metrics")
        # One stream of 1,000 cards over the last 60 hours, cut in three: training, calm, shifted.
        span_ms = 60 * HOUR_MS
        generator = TransactionGenerator(GeneratorConfig(
            seed=11, cards=1_000, start_ms=int(time.time() * 1000) - span_ms,
            mean_gap_ms=span_ms / (TRAIN + CALM + SHIFTED), fraud_rate=0.02, id_prefix="drift"))
        producer = SyntheticProducer(settings.kafka, spec.topics.source, spec.labels.topic, generator)

        def segment(events: int, total: int) -> float:
            producer.run(events, None, backfill=True)
            assert not producer.errors
            wait_for(lambda: count_committed(settings.kafka, spec.topics.predictions, idle_s=1.0) == total, 180,
                     f"{total} predictions")
            return time.time()

        segment(TRAIN, TRAIN)
        trained = retrain(settings.kafka, spec, settings.artifacts, settings.signing_key(), "cpu",
                          "always")
        assert trained.published
        wait_for(lambda: status(env)["parts"]["scorer-0"].get("model_version") == trained.version, 60,
                 "the scorer serving the retrained model")

        since = segment(CALM, TRAIN + CALM)
        calm = wait_for(lambda: drift_after(env, since, trained.version), 60, "a drift window of the calm segment")
        assert all(f["psi"] < DRIFT_BOUND for f in calm["features"].values()), calm

        generator.amount_scale = 10.0
        since = segment(SHIFTED, TRAIN + CALM + SHIFTED)
        shifted = wait_for(lambda: drift_after(env, since, trained.version), 60, "a drift window of the shifted one")
        drifted = {name for name, f in shifted["features"].items() if f["psi"] > DRIFT_BOUND}
        assert drifted == AMOUNT_FEATURES, shifted
        assert shifted["score_psi"] > calm["score_psi"]

        def firing() -> set[str]:
            alerts = query(prometheus, 'ALERTS{alertname="EddyFeatureDrift", alertstate="firing"}')
            return {a["metric"]["feature"] for a in alerts}

        assert poll(lambda: firing() == AMOUNT_FEATURES, 90, every_s=2), firing()
        gauges = {r["metric"]["feature"]: float(r["value"][1])
                  for r in query(prometheus, "max by (feature) (eddy_feature_psi)")}
        assert gauges.keys() == set(spec.model_inputs)
        assert {n for n, v in gauges.items() if v > DRIFT_BOUND} == AMOUNT_FEATURES
        # the model dashboard's drift panels have data now
        assert unanswered_panels(prometheus, ("eddy_feature_psi", "eddy_feature_null_share", "eddy_score_psi"),
                                 spec.name) == []
        print(f"drift: calm {summary(calm)}; shifted {summary(shifted)}")
    finally:
        run_eddy(["down"], env)
