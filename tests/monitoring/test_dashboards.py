"""eddy's Grafana dashboards: the committed JSON is what deploy/monitoring/dashboards.py builds, it
validates against Grafana's dashboard schema (generated from @grafana/schema by
deploy/monitoring/schema.sh), and every panel query selects only catalogued series or recording rules,
parses in promtool and returns series on data shaped like the catalogue."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.monitoring import dashboards
from deploy.monitoring.promql import expand_variables, selected_names
from streams import catalogue

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "monitoring" / "rules" / "eddy.rules.yml"
SCHEMA = REPO / ".tools" / "grafana-schema" / "dashboard.schema.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed: deploy/monitoring/install.sh (run by make setup) installs it")
# What Grafana puts in for the variables, as the checks run the queries.
VARIABLES = {"pipeline": ".+", "datasource": "prometheus", "__rate_interval": "5m"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def committed() -> dict[str, dict]:
    return {spec.name: json.loads((dashboards.OUT / f"{spec.name}.json").read_text()) for spec in dashboards.DASHBOARDS}


def targets() -> list[tuple[str, str]]:
    """(where, expr) of every panel query of the committed dashboards."""
    found = []
    for name, board in committed().items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((f"{name} #{panel['id']} {target['refId']} {panel['title']}", target["expr"]))
    return found


def recorded() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}


def test_committed_json_is_what_the_code_builds() -> None:
    for spec in dashboards.DASHBOARDS:
        path = dashboards.OUT / f"{spec.name}.json"
        assert path.read_text() == dashboards.render(spec), f"{path.name} is stale: python -m deploy.monitoring.dashboards"
    assert dashboards.main(["--check"]) == 0


def test_dashboards_validate_against_grafanas_schema() -> None:
    import jsonschema

    if not SCHEMA.exists():
        assert os.environ.get("CI") != "true", f"{SCHEMA} is missing under CI: deploy/monitoring/schema.sh did not run"
        pytest.skip(f"{SCHEMA.relative_to(REPO)} not generated: run deploy/monitoring/schema.sh (make setup does)")
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    for name, board in committed().items():
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(board)]
        assert errors == [], name
        assert board["schemaVersion"] == 41  # Grafana 11.6
    # The schema does hold: a panel of the wrong shape and an unknown field are refused.
    broken = copy.deepcopy(committed()["pipeline"])
    broken["panels"][1]["gridPos"]["h"] = "8"
    broken["refreshEvery"] = "30s"
    assert len(list(validator.iter_errors(broken))) == 2


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    for name, board in committed().items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        cells: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, (name, panel["title"])
            mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not cells & mine, f"{name}: {panel['title']} overlaps another panel"
            cells |= mine
            assert panel["type"] == "row" or (panel["targets"] and panel["description"]), (name, panel["title"])


def test_queries_select_only_catalogued_series_and_recording_rules() -> None:
    known = catalogue.series_names() | recorded()
    for where, expr in targets():
        assert selected_names(expr), where
        assert selected_names(expr) <= known, f"{where}: {selected_names(expr) - known} unknown"
    for board in committed().values():
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                metric = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"])
                assert metric and metric[1] in known, variable["query"]


def test_every_catalogued_metric_is_on_a_dashboard() -> None:
    """Directly or through the recording rules the dashboards read."""
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    shown = set()
    for _, expr in targets():
        for name in selected_names(expr):
            shown.add(name)
            shown |= {n for r in rules if r["record"] == name for n in selected_names(r["expr"])}
    missing = {m.name for m in catalogue.METRICS if not set(m.series) & shown}
    assert missing == set()


def test_threshold_lines_are_the_alerts_bounds() -> None:
    exprs = {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
             if "alert" in r}
    for alert, bound in dashboards.ALERT_BOUNDS.items():
        assert re.search(rf"> {bound:g}\b", exprs[alert]), (alert, bound)


def panels_rules(path: Path, extra: tuple[tuple[str, str], ...] = ()) -> None:
    """A rules file with every panel query (and `extra`) as a recording rule (parse check) and, in a
    group of its own, an alert that fires when the query returns nothing."""
    queries = [(where, expand_variables(expr, VARIABLES)) for where, expr in [*targets(), *extra]]
    path.write_text(yaml.safe_dump({"groups": [
        {"name": "parse", "rules": [{"record": f"panel:query:{i}", "expr": e} for i, (_, e) in enumerate(queries)]},
        {"name": "panels", "rules": [{"alert": "PanelReturnsNothing", "expr": f"absent({e})", "labels": {"panel": w}}
                                     for w, e in queries]},
    ]}, sort_keys=False, width=1000))


@needs_promtool
def test_every_query_parses_in_promtool(tmp_path: Path) -> None:
    panels_rules(tmp_path / "panels.rules.yml")
    result = promtool("check", "rules", str(tmp_path / "panels.rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {2 * len(targets())} rules found" in result.stdout


def catalogue_series(minutes: int) -> list[dict[str, str]]:
    """promtool input series: every catalogued metric for every stage, one sample a minute."""
    values = {"fraud": "fraud", "topic": "features", "partition": "0", "reason": catalogue.REFUSAL_REASONS[0],
              "version": "v1", "device": "cpu", "batch": catalogue.MODEL_CALL_BATCHES[2], "feature": "amount_sum_1h",
              "table": "predictions"}
    out = []
    for stage in catalogue.STAGES:
        target = f'job="eddy-{stage}",instance="127.0.0.1:9000"'
        out += [{"series": f"up{{{target}}}", "values": f"1x{minutes}"},
                {"series": f"scrape_duration_seconds{{{target}}}", "values": f"0.01x{minutes}"},
                {"series": f"process_resident_memory_bytes{{{target}}}", "values": f"100000000x{minutes}"},
                {"series": f"process_cpu_seconds_total{{{target}}}", "values": f"0+30x{minutes}"}]
        for metric in catalogue.METRICS:
            labels = {"pipeline": "fraud", "stage": stage, **{k: v for k, v in values.items() if k in metric.labels}}
            if "stage" not in metric.labels and stage != catalogue.STAGES[0]:
                continue
            selector = ",".join(f'{k}="{v}"' for k, v in labels.items() if k in metric.labels) + "," + target
            if metric.kind == "counter":
                out.append({"series": f"{metric.name}{{{selector}}}", "values": f"0+60x{minutes}"})
            elif metric.kind == "gauge":
                out.append({"series": f"{metric.name}{{{selector}}}", "values": f"1x{minutes}"})
            else:
                for le in [*map(str, metric.buckets), "+Inf"]:
                    out.append({"series": f'{metric.name}_bucket{{{selector},le="{le}"}}', "values": f"0+60x{minutes}"})
                out.append({"series": f"{metric.name}_sum{{{selector}}}", "values": f"0+6x{minutes}"})
                out.append({"series": f"{metric.name}_count{{{selector}}}", "values": f"0+60x{minutes}"})
    return out


@needs_promtool
def test_every_query_returns_series_on_catalogue_shaped_data(tmp_path: Path) -> None:
    """Each query, run by promtool's engine over every catalogued series (eddy's rules loaded, so the
    recording rules and ALERTS exist), returns at least one series."""
    control = ("control: a stage no series has", 'eddy_records_in_total{stage=~"none"}')
    panels_rules(tmp_path / "panels.rules.yml", (control,))
    suite = {
        "rule_files": [str(RULES), "panels.rules.yml"],
        "evaluation_interval": "1m",
        "group_eval_order": ["eddy.recording", "eddy.alerts", "parse", "panels"],
        "tests": [{"interval": "1m", "input_series": catalogue_series(40),
                   "alert_rule_test": [{"eval_time": "30m", "alertname": "PanelReturnsNothing",
                                        "exp_alerts": [{"exp_labels": {"panel": control[0]}}]}]}],
    }
    (tmp_path / "panels.test.yml").write_text(yaml.safe_dump(suite, sort_keys=False, width=1000))
    result = promtool("test", "rules", "panels.test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def unanswered_panels(prometheus: str, metrics: tuple[str, ...], pipeline: str, timeout_s: float = 60) -> list[str]:
    """The dashboard queries selecting any of `metrics` that still return no series after timeout_s
    against a live Prometheus (each polled until it answers)."""
    from deploy.monitoring.promql import expand_variables, selected_names
    from deploy.prometheus_local import query
    from features.waiting import poll

    chosen = [(where, expr) for where, expr in targets() if set(selected_names(expr)) & set(metrics)]
    assert chosen, f"no dashboard panel selects {metrics}"
    return [where for where, expr in chosen
            if not poll(lambda e=expr: query(prometheus, expand_variables(e, {**VARIABLES, "pipeline": pipeline})),
                        timeout_s, every_s=2)]
