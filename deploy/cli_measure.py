"""The measuring commands of `eddy`: `bench` (speed against baselines on a private stack) and `chaos`
(a soak of the running stack under random faults, then the exactly-once checker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from deploy.cli_base import HomeOpt, InsecureOpt, PipelineOpt, StagesOpt, app, err, out, settings_from

PANEL = "Measure"  # where `eddy --help` lists these


@app.command(rich_help_panel=PANEL)
def bench(
    events: Annotated[int, typer.Option("--events", help="backlog size for the ceiling and the drain")] = 100_000,
    loads: Annotated[str | None, typer.Option("--loads", help="fixed loads in events/s, comma separated "
                                                            "(default 1000,5000; with --peers one, 2000)")] = None,
    load_seconds: Annotated[float, typer.Option("--load-seconds", help="seconds per fixed load")] = 15.0,
    engine: Annotated[str | None, typer.Option("--engine", help="feature engine: native (the default), faust or flink")] = None,
    out_file: Annotated[str | None, typer.Option("--out", help="write the JSON here")] = None,
    ingest: Annotated[bool, typer.Option("--ingest/--no-ingest", help="run lakehouse ingestion in the measured stack too")] = False,
    scorers: Annotated[int | None, typer.Option("--scorers", help="scorer replicas")] = None,
    stages: StagesOpt = None,
    compare: Annotated[bool, typer.Option("--compare", help="the native engine three ways, one stack each: split, "
                                                            "fused, fused at least once; a column each")] = False,
    peers: Annotated[bool, typer.Option("--peers", help="the native feature engine against Quix Streams and Bytewax "
                                                        "running eddy's feature step, on one backlog of --events")] = False,
    sample: Annotated[int, typer.Option("--sample", help="with --peers: rows compared to eddy's per peer (0: all)")] = 2000,
    distributed: Annotated[bool, typer.Option("--distributed", help="the private stack as `eddy up --distributed` makes "
                                              "it: 3 brokers, 2 feature-stage workers, the local object store, a Spark "
                                              "standalone cluster")] = False,
    object_store: Annotated[bool, typer.Option("--object-store", help="the private stack's lake and models on the local "
                                               "object store, the rest as on one box")] = False,
    insecure: InsecureOpt = False,
    pipeline: PipelineOpt = None,
) -> None:
    """Benchmark on a private stack: Kafka ceiling, drain rate, latency at fixed loads, scoring."""
    from deploy.bench import run_bench, run_compare

    settings = settings_from("bench", pipeline=pipeline, engine=engine, scorers=scorers, stages=stages,
                             insecure="on" if insecure else None)
    from deploy.bench_peers import LOAD_RATE

    loads = loads or (str(LOAD_RATE) if peers else "1000,5000")
    try:
        rates = [int(r) for r in loads.split(",") if r.strip()]
    except ValueError:
        raise typer.BadParameter(f"--loads {loads!r}: give events/s as integers, e.g. 1000,5000") from None
    if peers and len(rates) != 1:
        raise typer.BadParameter(f"--loads {loads!r}: --peers measures one fixed load per engine; give one rate")
    def progress(line: str) -> None:
        err.print(f"[bench] {line}", markup=False, highlight=False)

    if peers:
        result = bench_peers(settings, events, sample, (rates[0], load_seconds), progress)
    elif compare:
        result = run_compare(settings, events=events, loads=rates, load_seconds=load_seconds, on_progress=progress)
        print_compare(result)
    else:
        result = run_bench(settings, events=events, loads=rates, load_seconds=load_seconds, engine=settings.engine,
                           ingest=ingest, on_progress=progress, distributed=distributed, object_store=object_store)
        print_bench(result)
    if out_file:
        Path(out_file).write_text(json.dumps(result, indent=2))
        out.print(f"wrote {out_file}")


def bench_peers(settings, events: int, sample: int, load: tuple[int, float], progress) -> dict:
    """`eddy bench --peers`: run_peers and its table; a line naming the fix, and exit 1, when the peers'
    packages are not installed."""
    from deploy.bench_peers import peers_missing, run_peers

    missing = peers_missing()
    if missing:
        err.print(f"eddy bench --peers: {missing}", markup=False, highlight=False)
        raise typer.Exit(1)
    result = run_peers(settings, events=events, sample=sample, load=load, on_progress=progress)
    print_peers(result)
    return result


def print_peers(result: dict) -> None:
    """run_peers' result: a row per engine, then the goals' ratios."""
    load = result.get("load") or {}
    engines = result["engines"]
    sampled = next((run["rows_equal"]["sampled"] for run in engines.values() if run.get("rows_equal")), 0)
    table = Table(title=f"eddy bench --peers: {result['events']:,} events, {result['partitions']} partitions, "
                        f"{result['machine']['cpus']} CPUs, load {load.get('rate', 0):,}/s x {load.get('seconds', 0):g} s",
                  box=None)
    for column in ("engine", "mode", "commit", "events/s", "CPU s", "1st row", "equal", "p50/p99", "seen"):
        table.add_column(column, justify="left" if column in ("engine", "mode") else "right", no_wrap=True)
    for name, run in engines.items():
        same = run.get("rows_equal")
        every = run["commit_interval_s"] if run.get("snapshot_s") is None else run["snapshot_s"]
        at_load = run.get("load") or {}
        visible = at_load.get("visible_ms") or {}
        table.add_row(name, {"exactly_once": "EOS", "at_least_once": "ALO"}.get(run["guarantee"], run["guarantee"]),
                      f"{every:g}", f"{run.get('events_per_s', 0):,.0f}", f"{run.get('cpu_s_per_100k', '-')}",
                      f"{run.get('first_row_after_first_event_s', '-')}",
                      "ref" if same is None else f"{same['equal']}",
                      f"{visible['p50']:.0f}/{visible['p99']:.0f}" if visible.get("count") else "-",
                      f"{at_load['seen']}" if at_load else "-")
    out.print(table)
    out.print("events/s: first event to last row visible to read_committed; CPU s: the engine's process per 100k "
              "events; mode: EOS exactly once, ALO at least once; commit: its interval in s, Bytewax's snapshot interval; "
              f"1st row: its first row's wait for a commit, s; equal: of {sampled:,} sampled rows, those equal to eddy's "
              "(ref); p50/p99: visible latency in ms at the fixed load after the drain (when a row reached a read_committed "
              f"reader minus its source record's Kafka timestamp); seen: of the load's "
              f"{int(load.get('rate', 0) * load.get('seconds', 0)):,} events, those with a row")
    for goal in result.get("goals", []):
        verdict = "met" if goal["met"] else "not met"
        if "ratio" in goal:
            out.print(f"{goal['goal']}: {goal['ratio']}x (goal >= {goal['at_least']}x: {verdict})")
        else:
            out.print(f"{goal['goal']}: {goal['p99_ms']} ms against {goal['peers_p99_ms']} ({verdict})")


def print_bench(result: dict) -> None:
    """run_bench's result as a table on stdout."""
    metrics = "" if result.get("metrics", True) else ", metrics off"
    table = Table(title=f"eddy bench ({result['engine']} engine, {result.get('stages', 'split')} stages, {result['device']}, {result['machine']['cpus']} CPUs"
                        f"{metrics})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    base = result["baselines"]
    table.add_row("end-to-end events/s (backlog drain)", f"{result['events_per_s']:,.0f}")
    table.add_row("Kafka passthrough ceiling events/s", f"{base['kafka_passthrough_events_per_s']:,.0f}")
    table.add_row("ratio to ceiling", f"{result['ratio_to_ceiling']:.2f}")
    for rate, load in result["loads"].items():
        lat, vis = load["latency_ms"], load["visible_latency_ms"]
        table.add_row(f"latency at {int(rate):,}/s p50 / p95 / p99 ms",
                      f"{lat['p50']} / {lat['p95']} / {lat['p99']} (visible {vis['p50']} / {vis['p99']})")
    for rate, load in result["loads"].items():
        f = load["feature_stage_latency_ms"]
        table.add_row(f"feature stage latency at {int(rate):,}/s p50 / p99 ms", f"{f['p50']} / {f['p99']}")
    table.add_row("hot swap: publish -> first prediction by the new model", f"{result['swap_to_first_prediction_s']} s")
    for stage, rate in result["per_stage_events_per_s"].items():
        table.add_row(f"stage {stage} peak events/s", f"{rate:,.0f}")
    table.add_row("CPU us per event in the drain, by part", ", ".join(
        f"{part} {us:g}" for part, us in result["drain"]["cpu_us_per_event"].items() if us >= 0.5))
    scoring = result["scoring"]
    table.add_row(f"model rows/s at batch {scoring['batch']:,} ({result['device']})", f"{result['scoring_rows_per_s']:,.0f}")
    table.add_row(f"scorer step events/s, batches of {scoring['batch']:,} / of 1",
                  f"{scoring['micro_batched_events_per_s']:,.0f} / {base['per_event_scoring_events_per_s']:,.0f} "
                  f"({scoring['ratio']}x)")
    if "shadow_events_per_s" in scoring:
        table.add_row("scorer step events/s in a rollout: shadow / 30% canary",
                      f"{scoring['shadow_events_per_s']:,.0f} ({scoring['shadow_ratio']}x) / "
                      f"{scoring['canary_30_events_per_s']:,.0f} ({scoring.get('canary_30_ratio', '-')}x)")
    lake = result.get("lakehouse")
    if lake:
        catch, fresh = lake["catch_up"], lake["freshness"]
        table.add_row("lakehouse catch-up rows/s (all tables)", f"{catch['rows_per_s']:,.0f} ({catch['rows']:,} rows)")
        table.add_row(f"lakehouse freshness p50 / p99 at {fresh['rate']:,}/s, trigger {fresh['trigger_s']}s",
                      f"{fresh['ms']['p50']} / {fresh['ms']['p99']} ms")
        table.add_row("lakehouse ingestion memory (process + JVM)", f"{lake['rss_mb']} MB")
    out.print(table)


def print_compare(result: dict) -> None:
    """run_compare's result: a column per shape, the split stages' first."""
    runs = result["configs"]
    first = next(iter(runs.values()))
    table = Table(title=f"eddy bench --compare (native engine, {first['device']}, {first['machine']['cpus']} CPUs)")
    table.add_column("measure")
    for name in runs:
        table.add_column(name.replace("_", " "), justify="right")

    def row(label: str, cell) -> None:
        table.add_row(label, *(cell(name, r) for name, r in runs.items()))

    row("end-to-end events/s (backlog drain)", lambda _n, r: f"{r['events_per_s']:,.0f}")
    row("ratio to split", lambda n, _r: f"{result['ratio_to_split'][n]:.2f}x")
    row("Kafka passthrough ceiling events/s", lambda _n, r: f"{r['baselines']['kafka_passthrough_events_per_s']:,.0f}")
    for rate in first["loads"]:
        row(f"latency at {int(rate):,}/s p50 / p99 ms",
            lambda _n, r, rate=rate: f"{r['loads'][rate]['latency_ms']['p50']} / {r['loads'][rate]['latency_ms']['p99']}")
        row(f"visible at {int(rate):,}/s p50 / p99 ms",
            lambda _n, r, rate=rate: (f"{r['loads'][rate]['visible_latency_ms']['p50']} / "
                                      f"{r['loads'][rate]['visible_latency_ms']['p99']}"))
    row("hot swap: publish -> first prediction", lambda _n, r: f"{r['swap_to_first_prediction_s']} s")
    row("CPU us per event in the drain, by part", lambda _n, r: ", ".join(
        f"{part} {us:g}" for part, us in r["drain"]["cpu_us_per_event"].items() if us >= 0.5))
    out.print(table)


@app.command(rich_help_panel=PANEL)
def chaos(
    minutes: Annotated[float, typer.Option("--minutes", help="how long the live stream runs")] = 10.0,
    rate: Annotated[int, typer.Option("--rate", help="events/s of the live stream")] = 500,
    every: Annotated[float, typer.Option("--every", help="seconds between faults, on average, after each recovery")] = 60.0,
    faults: Annotated[str, typer.Option("--faults", help="comma separated, from: engine, writer, scorer, broker, controller, redis, "
                                                          "redis-pause")] = "engine,writer,scorer,broker,controller,redis,redis-pause",
    seed: Annotated[int, typer.Option("--seed", help="random seed of the fault sequence and the events")] = 0,
    out_file: Annotated[str | None, typer.Option("--out", help="write the JSON summary here")] = None,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """A soak of the running stack: a live stream while random faults fall on it, then the exactly-once checker; exits 1 on any loss, duplicate or wrong value."""
    from deploy.chaos import parse_faults, soak

    settings = settings_from("chaos", home=home, pipeline=pipeline)
    report = soak(settings, minutes=minutes, rate=rate, every_s=every, faults=parse_faults(faults), seed=seed,
                  say=lambda line: err.print(f"[chaos] {line}", markup=False, highlight=False))
    summary = report.public()
    table = Table(title=f"eddy chaos: {summary['faults']} faults in {minutes:g} min at {rate}/s (seed {seed})")
    for column in ("fault", "count", "restart s (median / max)", "recovery s (median / max)"):
        table.add_column(column, justify="left" if column == "fault" else "right")
    for name, row in summary["by_fault"].items():
        table.add_row(name, str(row["count"]), f"{row['restart_s_median']} / {row['restart_s_max']}",
                      f"{row['recovery_s_median']} / {row['recovery_s_max']}")
    out.print(table)
    verdict = report.verdict
    out.print(f"checker: {verdict.summary() if verdict else 'did not run'}; caught up {report.caught_up_s} s "
              "after the stream ended")
    if out_file:
        Path(out_file).write_text(json.dumps(summary, indent=2))
        out.print(f"wrote {out_file}")
    out.print("[green]ok[/green]: nothing lost, doubled or wrong" if report.ok
              else "[red]FAILED[/red]: see the summary above and the stages' logs")
    if not report.ok:
        raise typer.Exit(1)
