"""eddy's Prometheus rules and metric catalogue: promtool loads the rules and passes their unit tests
(deploy/monitoring/tests), each alert's tests catch the loss of the clause they exist for, every rule
selects only catalogued series, and the catalogue as prometheus_client serves it passes
`promtool check metrics`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deploy.monitoring.promql import selected_names
from streams import catalogue

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "rules" / "eddy.rules.yml"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed: deploy/monitoring/install.sh (run by make setup) installs it")

# A value for every label the catalogue uses, for sample expositions.
SAMPLE_LABELS = {"pipeline": "fraud", "stage": "scorer", "topic": "features", "partition": "0", "reason": "schema",
                 "version": "v1", "device": "cpu", "batch": "64-1023", "feature": "amount_sum_1h",
                 "table": "predictions"}


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def unit_tests() -> list[dict]:
    return [test for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]]


def test_promtool_is_installed_under_ci() -> None:
    """CI runs after make setup, which installs promtool: there a missing promtool is a failure, not a skip."""
    if PROMTOOL is None:
        assert os.environ.get("CI") != "true", "promtool is missing under CI: deploy/monitoring/install.sh did not run"
        pytest.skip("promtool is not installed: deploy/monitoring/install.sh (run by make setup) installs it")
    version = promtool("--version")
    assert version.returncode == 0 and re.search(r"promtool, version [23]\.", version.stdout + version.stderr)


@needs_promtool
def test_rules_load_in_promtool() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS) >= 4


def test_every_alert_is_tested_firing_and_silent() -> None:
    expected: dict[str, list[int]] = {}
    for test in unit_tests():
        for case in test.get("alert_rule_test", []):
            expected.setdefault(case["alertname"], []).append(len(case.get("exp_alerts") or []))
    for name in alerts():
        counts = expected.get(name, [])
        assert any(counts), f"{name}: no test where it fires"
        assert 0 in counts, f"{name}: no test where it stays silent"


def test_every_recording_rule_is_tested() -> None:
    exprs = " ".join(case["expr"] for test in unit_tests() for case in test.get("promql_expr_test", []))
    assert {name for name in recorded() if name not in exprs} == set()


def test_alerts_carry_for_severity_and_an_action() -> None:
    assert set(alerts()) == {
        "EddyConsumerLagGrowing", "EddyNoPredictionsWhileEventsArrive", "EddyDLQRateHigh", "EddyLatencyP99AboveSLO",
        "EddyStageDown", "EddyStageCrashLooping", "EddyModelUpdateRefused", "EddyFeatureDrift",
        "EddyLiveQualityBelowHoldout"}
    for name, rule in alerts().items():
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and "Action: " in rule["annotations"]["description"], name


def test_rules_select_only_catalogued_series() -> None:
    known = catalogue.series_names() | recorded()
    for rule in rules():
        unknown = selected_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')} selects {unknown}, not in the catalogue"


# Each alert's tests must fail when the clause they exist for is dropped or its bound moved:
# (alert, test file, text in eddy.rules.yml, its replacement).
MUTATIONS = [
    ("EddyConsumerLagGrowing", "alerts-flow", "lag_records:sum > 1000", "lag_records:sum > 100000"),
    ("EddyConsumerLagGrowing", "alerts-flow", "and deriv(pipeline_stage:eddy_consumer_lag_records:sum[10m]) > 0", ""),
    ("EddyNoPredictionsWhileEventsArrive", "alerts-flow", 'rate1m{stage="scorer"}) > 0', 'rate1m{stage="scorer"})'),
    ("EddyDLQRateHigh", "alerts-flow", "ratio_rate5m > 0.01", "ratio_rate5m > 0.1"),
    ("EddyDLQRateHigh", "alerts-flow", "ratio_rate5m > 0.01", "ratio_rate5m > 0.001"),
    ("EddyLatencyP99AboveSLO", "alerts-flow", '{stage="scorer", quantile="0.99"} > 1', '{quantile="0.99"} > 1'),
    ("EddyLatencyP99AboveSLO", "alerts-flow", '{stage="scorer", quantile="0.99"} > 1', '{stage="scorer", quantile="0.99"} > 2'),
    ("EddyStageDown", "alerts-stages", 'up{job=~"eddy-.+"} == 0', "up == 0"),
    ("EddyStageDown", "alerts-stages", '== 0\n        for: 1m', '== 0\n        for: 0m'),
    ("EddyStageCrashLooping", "alerts-stages", "[15m])) >= 3", "[15m])) >= 1"),
    ("EddyStageCrashLooping", "alerts-stages", "[15m])) >= 3", "[15m])) >= 30"),
    ("EddyModelUpdateRefused", "alerts-stages", "unless eddy_model_updates_refused_total offset 30m",
     "unless eddy_model_updates_refused_total"),
    ("EddyFeatureDrift", "alerts-model", "(eddy_feature_psi) > 0.2", "(eddy_feature_psi) > 0.35"),
    ("EddyFeatureDrift", "alerts-model", "(eddy_feature_psi) > 0.2\n        for: 15m",
     "(eddy_feature_psi) > 0.2\n        for: 2m"),
    ("EddyLiveQualityBelowHoldout", "alerts-model", ") > 0.10\n", ") > 0.25\n"),
    ("EddyLiveQualityBelowHoldout", "alerts-model", "(eddy_live_labelled) >= 1000", "(eddy_live_labelled) >= 0"),
    ("EddyLiveQualityBelowHoldout", "alerts-model", "(eddy_live_positives) >= 30", "(eddy_live_positives) >= 0"),
    ("EddyLiveQualityBelowHoldout", "alerts-model",
     "\n          and on (pipeline, version) max by (pipeline, version) (eddy_model_info)", ""),
]


@needs_promtool
@pytest.mark.parametrize(("alert", "suite", "old", "new"), MUTATIONS,
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(MUTATIONS)])
def test_alert_tests_fail_when_the_rule_is_weakened(tmp_path: Path, alert: str, suite: str, old: str, new: str) -> None:
    text = RULES.read_text()
    assert text.count(old) == 1, f"{old!r} should occur once in {RULES.name}"
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(text.replace(old, new))
    shutil.copy(MONITORING / "tests" / f"{suite}.test.yml", tmp_path / "tests")
    assert promtool("check", "rules", str(tmp_path / "rules" / RULES.name)).returncode == 0
    result = promtool("test", "rules", f"{suite}.test.yml", cwd=tmp_path / "tests")
    assert result.returncode != 0 and f"alertname: {alert}," in result.stdout + result.stderr, result.stdout


def test_catalogue_follows_prometheus_conventions() -> None:
    names = [m.name for m in catalogue.METRICS]
    assert len(names) == len(set(names))
    for metric in catalogue.METRICS:
        assert re.fullmatch(r"eddy_[a-z][a-z0-9_]*", metric.name), metric.name
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name
        assert metric.labels[0] == "pipeline" and set(metric.labels) <= set(SAMPLE_LABELS), metric.name
        assert (metric.kind == "histogram") == bool(metric.buckets), metric.name
        assert list(metric.buckets) == sorted(set(metric.buckets)), metric.name
        assert metric.help.endswith("."), metric.name
    # The latency SLO (1 s) is a bucket edge, so p99 above it is measured, not interpolated across it.
    assert 1.0 in catalogue.BY_NAME["eddy_latency_seconds"].buckets
    assert catalogue.BY_NAME["eddy_latency_seconds"].buckets[0] == 0.005
    assert catalogue.BY_NAME["eddy_latency_seconds"].buckets[-1] == 30.0


def catalogue_exposition() -> str:
    """The text format prometheus_client serves with one child of every catalogued metric."""
    registry = CollectorRegistry()
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    for metric in catalogue.METRICS:
        extra = {"buckets": metric.buckets} if metric.kind == "histogram" else {}
        child = kinds[metric.kind](metric.family, metric.help, metric.labels, registry=registry, **extra).labels(
            **{label: SAMPLE_LABELS[label] for label in metric.labels})
        if isinstance(child, Counter):
            child.inc(3)
        elif isinstance(child, Gauge):
            child.set(1)
        else:
            child.observe(0.2)
    return generate_latest(registry).decode()


def test_catalogue_exposition_has_every_series_with_its_labels() -> None:
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(catalogue_exposition()):
        for sample in family.samples:
            served[sample.name] = set(sample.labels) - {"le"}
    for metric in catalogue.METRICS:
        for series in metric.series:
            assert served.get(series) == set(metric.labels), series


@needs_promtool
def test_catalogue_exposition_passes_promtool_check_metrics() -> None:
    result = promtool("check", "metrics", stdin=catalogue_exposition())
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
    # The check does lint: a gauge named like a counter and an abbreviated unit are refused.
    bad = "# HELP eddy_bad_total x\n# TYPE eddy_bad_total gauge\neddy_bad_total 1\n"
    assert promtool("check", "metrics", stdin=bad).returncode != 0
