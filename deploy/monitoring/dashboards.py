"""Grafana dashboards as code: the pipeline overview, the model and the infrastructure, built with
grafana-foundation-sdk (Grafana 11.6) over the metric catalogue and the recording rules.

`python -m deploy.monitoring.dashboards` writes deploy/monitoring/dashboards/<name>.json (committed);
`--check` exits 1 when a committed file differs from what this module builds.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import units
from grafana_foundation_sdk.models.common import (
    GraphDrawStyle,
    GraphThresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    GridPos,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# The alerts' bounds drawn as threshold lines; tests/monitoring checks each against eddy.rules.yml.
ALERT_BOUNDS = {"EddyLatencyP99AboveSLO": 1.0, "EddyDLQRateHigh": 0.01, "EddyFeatureDrift": 0.2,
                "EddyConsumerLagGrowing": 1000.0}
P = 'pipeline=~"$pipeline"'  # every query's pipeline selector
EDDY_JOBS = 'job=~"eddy-.+"'
Kind = Literal["timeseries", "stat", "table", "bargauge"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = units.Short
    kind: Kind = "timeseries"
    width: int = 12
    height: int = 8
    bound: float | None = None  # an alert's bound: a dashed red line (a red step on stats)
    bars: bool = False


@dataclass(frozen=True)
class DashboardSpec:
    name: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = field(default_factory=tuple)


def q(expr: str, legend: str = "", instant: bool = False) -> tuple[Query, ...]:
    return (Query(expr, legend, instant),)


def quantiles(metric: str, by: str, legend: str, matchers: str = P) -> tuple[Query, ...]:
    """p50 and p99 of a histogram over the panel's rate interval."""
    rate = f"sum by ({by}, le) (rate({metric}_bucket{{{matchers}}}[$__rate_interval]))"
    return (Query(f"histogram_quantile(0.5, {rate})", f"{legend} p50"),
            Query(f"histogram_quantile(0.99, {rate})", f"{legend} p99"))


def per_second(metric: str, by: str, legend: str, matchers: str = P) -> tuple[Query, ...]:
    return q(f"sum by ({by}) (rate({metric}{{{matchers}}}[$__rate_interval]))", legend)


SERVING = f"max by (pipeline, version) (eddy_model_info{{{P}}})"

PIPELINE = DashboardSpec("pipeline", "eddy: pipeline overview", "Events/s per stage, lag, latency and dead letters.", (
    ("Now", (
        PanelSpec("Events in/s (source)", "Records the features stage consumes from the source topic.",
                  q(f'sum(pipeline_stage:eddy_records_in:rate1m{{{P}, stage="features"}})'),
                  units.RecordsPerSecond, "stat", 6, 4),
        PanelSpec("Predictions/s", "Records the scorer produces.",
                  q(f'sum(pipeline_stage:eddy_records_out:rate1m{{{P}, stage="scorer"}})'),
                  units.RecordsPerSecond, "stat", 6, 4),
        PanelSpec("End-to-end p99", "Transaction's Kafka timestamp to its prediction's, p99 over 5m; SLO 1 s.",
                  q(f'max(pipeline_stage:eddy_latency_seconds:quantile_rate5m{{{P}, stage="scorer", quantile="0.99"}})'),
                  units.Seconds, "stat", 6, 4, ALERT_BOUNDS["EddyLatencyP99AboveSLO"]),
        PanelSpec("Firing alerts", "eddy's alerts firing now.",
                  q('count by (alertname) (ALERTS{alertstate="firing", alertname=~"Eddy.+"})', "{{alertname}}",
                    instant=True), units.Short, "table", 6, 4),
    )),
    ("Throughput", (
        PanelSpec("Events in/s per stage", "Records consumed per second, replicas and partitions summed.",
                  q(f"sum by (stage) (pipeline_stage:eddy_records_in:rate1m{{{P}}})", "{{stage}}"),
                  units.RecordsPerSecond),
        PanelSpec("Records out/s per stage", "Records produced per second (features, predictions).",
                  q(f"sum by (stage) (pipeline_stage:eddy_records_out:rate1m{{{P}}})", "{{stage}}"),
                  units.RecordsPerSecond),
    )),
    ("Lag and latency", (
        PanelSpec("Consumer lag per group", "Records behind the partitions' ends, per consumer group "
                  "(eddy-<pipeline>-<stage>); the alert bound is 1000 and rising.",
                  q(f"pipeline_stage:eddy_consumer_lag_records:sum{{{P}}}", "eddy-{{pipeline}}-{{stage}}"),
                  units.Short, bound=ALERT_BOUNDS["EddyConsumerLagGrowing"]),
        PanelSpec("Consumer lag per partition", "The same lag, per topic partition.",
                  q(f"max by (stage, topic, partition) (eddy_consumer_lag_records{{{P}}})",
                    "{{stage}} {{topic}}/{{partition}}")),
        PanelSpec("End-to-end latency p50 / p99", "From the transaction's Kafka timestamp to the prediction's; "
                  "the SLO is p99 under 1 s.",
                  q(f'pipeline_stage:eddy_latency_seconds:quantile_rate5m{{{P}, stage="scorer"}}',
                    "{{pipeline}} p{{quantile}}"), units.Seconds, bound=ALERT_BOUNDS["EddyLatencyP99AboveSLO"]),
        PanelSpec("Latency p99 per stage", "From the source record's Kafka timestamp to each stage's output.",
                  q(f'pipeline_stage:eddy_latency_seconds:quantile_rate5m{{{P}, quantile="0.99"}}', "{{stage}}"),
                  units.Seconds),
    )),
    ("Dead letters", (
        PanelSpec("Dead-lettered share per stage", "Refused records over records consumed (5m); alert above 1%.",
                  q(f"pipeline_stage:eddy_records_refused:ratio_rate5m{{{P}}}", "{{stage}}"),
                  units.PercentUnit, bound=ALERT_BOUNDS["EddyDLQRateHigh"]),
        PanelSpec("Dead letters/s by reason", "Refused records per second by reason class.",
                  q(f"sum by (stage, reason) (pipeline_stage_reason:eddy_records_refused:rate5m{{{P}}})",
                    "{{stage}} {{reason}}"), units.RecordsPerSecond, bars=True),
        PanelSpec("Duplicates and late events/s", "Records dropped as duplicates, events later than the allowed "
                  "lateness.",
                  per_second("eddy_duplicates_total", "stage", "{{stage}} duplicates")
                  + per_second("eddy_late_events_total", "stage", "{{stage}} late"), units.RecordsPerSecond),
    )),
    ("Batches", (
        PanelSpec("Batch size", "Records per processed batch.",
                  quantiles("eddy_batch_records", "stage", "{{stage}}"), units.Short, width=8),
        PanelSpec("Batch time", "Processing time of one batch.",
                  quantiles("eddy_batch_seconds", "stage", "{{stage}}"), units.Seconds, width=8),
        PanelSpec("Transaction commit time", "Time to commit one Kafka transaction.",
                  quantiles("eddy_commit_seconds", "stage", "{{stage}}"), units.Seconds, width=8),
    )),
))

MODEL = DashboardSpec("model", "eddy: model", "The version serving, scoring, drift per feature, live quality.", (
    ("Serving", (
        PanelSpec("Version serving", "eddy_model_info per scorer process: the version and device it serves.",
                  q(f"max by (pipeline, stage, version, device, instance) (eddy_model_info{{{P}}})",
                    instant=True), units.Short, "table", 12, 6),
        PanelSpec("Model swaps and refused updates", "Versions swapped in, and updates refused (by reason).",
                  q(f"sum by (stage) (increase(eddy_model_swaps_total{{{P}}}[$__rate_interval]))", "{{stage}} swaps")
                  + q(f"sum by (stage, reason) (increase(eddy_model_updates_refused_total{{{P}}}[$__rate_interval]))",
                      "{{stage}} refused: {{reason}}"), units.Short, width=12, height=6, bars=True),
    )),
    ("Scoring", (
        PanelSpec("Scored rows/s", "Rows the model scored per second.",
                  per_second("eddy_scored_rows_total", "stage", "{{stage}}"), units.RecordsPerSecond),
        PanelSpec("Model call time p99 by batch size", "One model call, by batch size class.",
                  q(f"histogram_quantile(0.99, sum by (batch, le) "
                    f"(rate(eddy_model_call_seconds_bucket{{{P}}}[$__rate_interval])))", "batch {{batch}}"),
                  units.Seconds),
    )),
    ("Drift", (
        PanelSpec("Feature drift (PSI)", "Population stability index of each feature's live window against the "
                  "manifest's reference bins; alert above 0.2.",
                  q(f"max by (feature) (eddy_feature_psi{{{P}}})", "{{feature}}"), units.Short,
                  bound=ALERT_BOUNDS["EddyFeatureDrift"]),
        PanelSpec("Score distribution drift (PSI)", "PSI of the live scores against the training reference.",
                  q(f"max by (pipeline) (eddy_score_psi{{{P}}})", "{{pipeline}} score"), units.Short,
                  bound=ALERT_BOUNDS["EddyFeatureDrift"]),
        PanelSpec("Drift now", "The latest PSI per feature.",
                  q(f"max by (feature) (eddy_feature_psi{{{P}}})", "{{feature}}", instant=True), units.Short,
                  "bargauge", bound=ALERT_BOUNDS["EddyFeatureDrift"]),
        PanelSpec("Null share per feature", "Share of nulls in the live window (a broken producer shows here).",
                  q(f"max by (feature) (eddy_feature_null_share{{{P}}})", "{{feature}}"), units.PercentUnit),
    )),
    ("Live quality (serving version)", (
        PanelSpec("PR-AUC: live and holdout", "The serving version's PR-AUC on labelled predictions and on its "
                  "training holdout.",
                  q(f"max by (pipeline, version) (eddy_live_pr_auc{{{P}}}) and on (pipeline, version) {SERVING}",
                    "live {{version}}")
                  + q(f"max by (pipeline, version) (eddy_holdout_pr_auc{{{P}}}) and on (pipeline, version) {SERVING}",
                      "holdout {{version}}"), units.Short, width=8),
        PanelSpec("Precision at 0.5 and calibration error", "Precision at the serving threshold, and expected "
                  "calibration error.",
                  q(f"max by (pipeline, version) (eddy_live_precision{{{P}}}) and on (pipeline, version) {SERVING}",
                    "precision {{version}}")
                  + q(f"max by (pipeline, version) (eddy_live_calibration_error{{{P}}}) "
                      f"and on (pipeline, version) {SERVING}", "ECE {{version}}"), units.Short, width=8),
        PanelSpec("Labelled predictions", "The evidence behind the live numbers: labelled predictions and "
                  "positives.",
                  q(f"max by (pipeline, version) (eddy_live_labelled{{{P}}}) and on (pipeline, version) {SERVING}",
                    "labelled {{version}}")
                  + q(f"max by (pipeline, version) (eddy_live_positives{{{P}}}) and on (pipeline, version) {SERVING}",
                      "positives {{version}}"), units.Short, width=8),
    )),
))

INFRASTRUCTURE = DashboardSpec("infrastructure", "eddy: infrastructure",
                               "Processes, the broker, Redis and the lakehouse as eddy's stages see them.", (
    ("Processes", (
        PanelSpec("Targets down", "eddy scrape targets Prometheus cannot scrape.",
                  q(f"count(up{{{EDDY_JOBS}}} == 0) or vector(0)"), units.Short, "stat", 6, 6, 1),
        PanelSpec("Targets", "Each eddy scrape target: 1 up, 0 down.",
                  q(f"up{{{EDDY_JOBS}}}", instant=True), units.Short, "table", 6, 6),
        PanelSpec("Stage restarts", "Restarts by the supervisor; crash-looping when the supervisor says so.",
                  q(f"sum by (stage) (increase(eddy_stage_restarts_total{{{P}}}[$__rate_interval]))",
                    "{{stage}} restarts")
                  + q(f"max by (stage) (eddy_stage_crash_looping{{{P}}})", "{{stage}} crash-looping"),
                  units.Short, width=12, height=6, bars=True),
        PanelSpec("Memory per process", "Resident memory of each scraped process.",
                  q(f"sum by (job, instance) (process_resident_memory_bytes{{{EDDY_JOBS}}})", "{{job}} {{instance}}"),
                  units.BytesIEC),
        PanelSpec("CPU per process", "CPU seconds per second (cores) of each scraped process.",
                  q(f"sum by (job, instance) (rate(process_cpu_seconds_total{{{EDDY_JOBS}}}[$__rate_interval]))",
                    "{{job}} {{instance}}")),
    )),
    ("Broker", (
        PanelSpec("Kafka errors/s", "Kafka client errors per stage.",
                  per_second("eddy_kafka_errors_total", "stage", "{{stage}}"), width=8),
        PanelSpec("Transaction commit time", "Time to commit one Kafka transaction: the broker's answer time.",
                  quantiles("eddy_commit_seconds", "stage", "{{stage}}"), units.Seconds, width=8),
        PanelSpec("Scrape time", "How long Prometheus takes to scrape each process.",
                  q(f"max by (job) (scrape_duration_seconds{{{EDDY_JOBS}}})", "{{job}}"), units.Seconds, width=8),
    )),
    ("Redis", (
        PanelSpec("Redis errors/s", "Failed Redis calls per stage.",
                  per_second("eddy_redis_errors_total", "stage", "{{stage}}"), width=8),
        PanelSpec("State writes/s", "Writes to the state store per stage.",
                  per_second("eddy_state_writes_total", "stage", "{{stage}}"), units.WritesPerSecond, width=8),
        PanelSpec("Entities in state", "Entities each stage holds.",
                  q(f"sum by (stage) (eddy_entities{{{P}}})", "{{stage}}"), width=8),
    )),
    ("Lakehouse", (
        PanelSpec("Freshness per table", "Age of the newest committed row's Kafka timestamp.",
                  q(f"max by (table) (eddy_lakehouse_freshness_seconds{{{P}}})", "{{table}}"), units.Seconds),
        PanelSpec("Ingested records/s per topic", "Records the lakehouse stage consumes, per topic.",
                  per_second("eddy_records_in_total", "topic", "{{topic}}", f'{P}, stage="lakehouse"'),
                  units.RecordsPerSecond),
    )),
))

DASHBOARDS = (PIPELINE, MODEL, INFRASTRUCTURE)


def _panel(spec: PanelSpec, panel_id: int, pos: GridPos) -> Any:
    builders: dict[str, Callable[[], Any]] = {"timeseries": timeseries.Panel, "stat": stat.Panel,
                                               "table": table.Panel, "bargauge": bargauge.Panel}
    panel = (builders[spec.kind]().id(panel_id).title(spec.title).description(spec.description)
             .datasource(DATASOURCE).unit(spec.unit).grid_pos(pos))
    for i, query in enumerate(spec.queries):
        target = prometheus.Dataquery().ref_id(chr(ord("A") + i)).expr(query.expr).datasource(DATASOURCE)
        if query.legend:
            target = target.legend_format(query.legend)
        target = target.instant() if query.instant else target.range()
        if spec.kind == "table":
            target = target.format(PromQueryFormat.TABLE)
        panel = panel.with_target(target)
    if spec.bound is not None:
        panel = panel.thresholds(dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
            [Threshold(value=None, color="green"), Threshold(value=spec.bound, color="red")]))
    if spec.kind == "timeseries":
        legend = (VizLegendOptions().display_mode(LegendDisplayMode.TABLE).placement(LegendPlacement.BOTTOM)
                  .show_legend(True).calcs(["lastNotNull", "max"]))
        panel = panel.legend(legend)
        if spec.bars:
            panel = panel.draw_style(GraphDrawStyle.BARS).fill_opacity(80)
        if spec.bound is not None:
            panel = panel.thresholds_style(GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED))
    if spec.kind == "table":
        panel = panel.with_transformation(DataTransformerConfig(id_val="organize",
                                                                options={"excludeByName": {"Time": True}}))
    return panel


def build(spec: DashboardSpec) -> dict[str, Any]:
    """The dashboard's JSON model as a dict."""
    board = (dashboard.Dashboard(spec.title).uid(f"eddy-{spec.name}").description(spec.description)
             .tags(["eddy"]).refresh("30s").time("now-1h", "now").timezone("browser")
             .link(dashboard.DashboardLink("eddy dashboards").type(DashboardLinkType.DASHBOARDS).tags(["eddy"])
                   .as_dropdown(True))
             .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
             .with_variable(dashboard.QueryVariable("pipeline").label("Pipeline").datasource(DATASOURCE)
                            .query("label_values(eddy_records_in_total, pipeline)")
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)))
    panel_id, y = 1, 0
    for row_title, panels in spec.rows:
        board = board.with_row(dashboard.Row(row_title).id(panel_id).grid_pos(GridPos(h=1, w=24, x=0, y=y)))
        panel_id, y, x, row_height = panel_id + 1, y + 1, 0, 0
        for panel in panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            board = board.with_panel(_panel(panel, panel_id, GridPos(h=panel.height, w=panel.width, x=x, y=y)))
            panel_id, x, row_height = panel_id + 1, x + panel.width, max(row_height, panel.height)
        y += row_height
    model: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    # The SDK writes the interval variable's auto* fields on every variable; Grafana's schema has
    # them on no other kind, and they mean nothing there.
    for variable in model["templating"]["list"]:
        for key in ("auto", "auto_count", "auto_min"):
            variable.pop(key, None)
    return model


def render(spec: DashboardSpec) -> str:
    """The committed bytes of a dashboard: sorted keys, two-space indent, a final newline."""
    return json.dumps(build(spec), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    stale = []
    for spec in DASHBOARDS:
        path, text = OUT / f"{spec.name}.json", render(spec)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            OUT.mkdir(exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m deploy.monitoring.dashboards", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
