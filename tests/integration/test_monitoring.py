"""Monitoring on a real stack (`eddy up --monitoring`, native engine): Prometheus scrapes every stage,
its counters equal what the topics hold, each stage's exposition passes promtool, every dashboard
query runs on the live data, a paused stage fires EddyStageDown which resolves when it resumes, and a
killed stage is restarted by the supervisor and counted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from deploy.monitoring.promql import expand_variables, selected_names
from deploy.prometheus_local import query
from features.waiting import poll
from tests.conftest import run_eddy, stack_environment
from tests.kafka_helpers import count_committed
from tests.monitoring.test_dashboards import VARIABLES, targets
from tests.stack_helpers import fetch, status, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]
EVENTS = 3_000
STAGES = {"eddy-supervisor", "eddy-features", "eddy-online-writer", "eddy-scorer"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from deploy.settings import load_settings
    from features.spec import load_spec

    env = {**stack_environment(tmp_path_factory.mktemp("monitoring") / "home"), "EDDY_ENGINE": "native", "EDDY_STAGES": "split"}
    settings = load_settings(environ=env)
    try:
        up = run_eddy(["up", "--monitoring"], env)
        assert up.returncode == 0, up.stderr
        settings = load_settings(environ=env)  # signed in: `eddy up` made the stack's credentials
        prometheus = status(env)["parts"]["prometheus"]["metrics_url"].removesuffix("/metrics")
        produced = run_eddy(["produce", "--count", str(EVENTS), "--backfill", "1h", "--label-delay", "0"], env)
        assert produced.returncode == 0, produced.stderr
        yield env, settings, load_spec(settings.pipeline), prometheus
    finally:
        run_eddy(["down"], env)


def value(prometheus: str, expr: str) -> float | None:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_every_stage_and_its_counters_equal_the_topics(stack):
    env, settings, spec, prometheus = stack
    wait_for(lambda: {r["metric"]["job"] for r in query(prometheus, 'up{job=~"eddy-.+"} == 1')} >= STAGES, 60,
             "every stage's target up")
    wait_for(lambda: value(prometheus, f'sum(eddy_records_out_total{{stage="scorer",topic="{spec.topics.predictions}"}})')
             == EVENTS, 120, "the predictions counted")
    sources = count_committed(settings.kafka, spec.topics.source)
    predictions = count_committed(settings.kafka, spec.topics.predictions)
    assert sources == predictions == EVENTS
    assert value(prometheus, f'sum(eddy_records_in_total{{stage="features",topic="{spec.topics.source}"}})') == sources
    assert value(prometheus, f'sum(eddy_records_out_total{{stage="features",topic="{spec.topics.features}"}})') == EVENTS
    assert value(prometheus, f'sum(eddy_records_in_total{{stage="scorer",topic="{spec.topics.features}"}})') == EVENTS
    assert value(prometheus, 'sum(eddy_records_refused_total{stage="features"})') == 0
    assert value(prometheus, 'count(eddy_model_info{stage="scorer",version="baseline-1"})') == 1
    # eddy status reads the same numbers from the heartbeats
    assert status(env)["parts"]["scorer-0"]["events"] == EVENTS


def test_each_stage_exposition_passes_promtool(stack):
    env, *_ = stack
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: make setup installs it"
    urls = {name: part["metrics_url"] for name, part in status(env)["parts"].items() if part.get("metrics_url")}
    assert {"features-native", "online-writer", "scorer-0", "supervisor"} <= set(urls)
    for name, url in urls.items():
        if name not in ("supervisor", "prometheus"):  # each stage is ready: it reaches the broker
            assert fetch(url.replace("/metrics", "/ready"))[0] == 200, name
        text = fetch(url)[1]
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
        assert check.returncode == 0, (name, check.stdout.decode(), check.stderr.decode())


def test_every_dashboard_query_runs_on_the_live_data(stack):
    env, settings, spec, prometheus = stack
    wait_for(lambda: value(prometheus, "count(pipeline_stage:eddy_records_in:rate1m)"), 60, "the recording rules")
    present = {r["metric"]["__name__"] for r in query(prometheus, '{__name__=~"eddy_.+|pipeline_stage:.+|up|process_.+"}')}
    answered, empty = [], []
    for where, expr in targets():
        result = query(prometheus, expand_variables(expr, {**VARIABLES, "pipeline": spec.name}))  # refused: raises
        names = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in selected_names(expr)}
        series = {n for n in present if n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") in names}
        absent_stage = any(f'stage="{stage}"' in expr for stage in ("lakehouse", "retrainer"))  # not in this stack
        if series and set(selected_names(expr)) <= present and not absent_stage:
            # a recording rule's series of one stage may come an evaluation (5 s) after another's
            result = result or poll(lambda e=expr: query(prometheus, expand_variables(e, {**VARIABLES, "pipeline": spec.name})),
                                    30, every_s=2)
            (answered if result else empty).append(where)
    # every query whose series this stack serves returns data (drift, live quality, freshness, the
    # lakehouse's stage and Prometheus's own ALERTS are not in this stack: their queries only have to run)
    assert len(answered) >= 20 and empty == [], empty


def test_a_paused_stage_fires_stage_down_and_it_resolves(stack):
    env, settings, spec, prometheus = stack
    firing = 'ALERTS{alertname="EddyStageDown",alertstate="firing",part="online-writer"}'
    pid = status(env)["parts"]["online-writer"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive to the supervisor, silent to Prometheus
    try:
        wait_for(lambda: query(prometheus, firing), 150, "EddyStageDown to fire")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: not query(prometheus, 'ALERTS{alertname="EddyStageDown",part="online-writer"}'), 120,
             "EddyStageDown to resolve")


def test_a_killed_stage_comes_back_and_its_restart_is_counted(stack):
    env, settings, spec, prometheus = stack
    before = status(env)["parts"]["scorer-0"]
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(lambda: (p := status(env)["parts"]["scorer-0"])["state"] == "up" and p["pid"] != before["pid"], 90,
             "the supervisor to bring the scorer back")
    wait_for(lambda: value(prometheus, 'eddy_stage_restarts_total{stage="scorer"}') == before["restarts"] + 1, 60,
             "the restart in Prometheus")
    assert status(env)["parts"]["scorer-0"]["last_reason"] == "killed by SIGKILL"
