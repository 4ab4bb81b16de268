"""The `eddy` command line: flags and EDDY_* variables become Settings here, then each command runs. The
stack, stream and lakehouse commands live here; the model commands in deploy/cli_models.py, bench and
chaos in deploy/cli_measure.py."""

from __future__ import annotations

import json
import sys
from typing import Annotated

# Feast's import sets PROMETHEUS_MULTIPROC_DIR for the whole process, which would switch every metric
# prometheus_client creates afterwards to multi-process files; each eddy process serves its own
# metrics, so prometheus_client is loaded here, before anything can import Feast.
import prometheus_client  # noqa: F401
import typer
from confluent_kafka import KafkaException
from rich.table import Table

from deploy import cli_measure, cli_models  # noqa: F401 - register the measuring, model and rollout commands on the app
from deploy.cli_base import HomeOpt, InsecureOpt, PipelineOpt, StagesOpt, app, err, out, settings_from
from deploy.environment import export_store_environment
from deploy.home_records import distributed_flags, local_flink_flags, local_store_flags
from features.errors import ConfigError, EddyError


@app.command()
def up(
    engine: Annotated[str | None, typer.Option("--engine", help="feature engine: native (the default), faust or flink")] = None,
    partitions: Annotated[int | None, typer.Option("--partitions", help="partitions per topic (default 3)")] = None,
    scorers: Annotated[int | None, typer.Option("--scorers", help="scorer replicas in one consumer group (default 1)")] = None,
    engine_workers: Annotated[int | None, typer.Option("--engine-workers", help="native feature-stage workers in one consumer "
                                                                                "group, each with its share of the partitions (default 1)")] = None,
    brokers: Annotated[int | None, typer.Option("--brokers", help="local Kafka brokers; 3 or more: every topic on 3 replicas, "
                                                                  "min.insync.replicas 2 (default: as the home's cluster was made, else 1)")] = None,
    stages: StagesOpt = None,
    ingest: Annotated[bool | None, typer.Option("--ingest/--no-ingest", help="run lakehouse ingestion (EDDY_INGEST, default on)")] = None,
    monitoring: Annotated[bool | None, typer.Option("--monitoring/--no-monitoring", help="a local Prometheus scraping every stage, with eddy's alert rules (EDDY_MONITORING, default off)")] = None,
    object_store: Annotated[bool, typer.Option("--object-store", help="the lakehouse and the model artifacts on a local "
                                               "S3-compatible store (S3Proxy), as on a cluster's object storage; later "
                                               "commands of this home find it (EDDY_LAKEHOUSE=s3a://..., EDDY_S3_ENDPOINT)")] = False,
    spark_cluster: Annotated[bool, typer.Option("--spark-cluster", help="ingestion and every Spark command on a local "
                                                "standalone cluster (a master and a worker, each its own process); "
                                                "later commands of this home use it (EDDY_SPARK_MASTER)")] = False,
    flink_cluster: Annotated[bool, typer.Option("--flink-cluster", help="the Flink engine's job on a local session cluster "
                                                "(a JobManager and EDDY_FLINK_TASKMANAGERS TaskManagers, each its own "
                                                "process, RocksDB state); implies --engine flink")] = False,
    distributed: Annotated[bool, typer.Option("--distributed", help="the cluster topology on this machine: --brokers 3 "
                                              "--object-store --spark-cluster, and --engine-workers 2 (with --engine "
                                              "flink: --flink-cluster)")] = False,
    insecure: InsecureOpt = False,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """Start the stack (broker, Redis, topics, feature engine, writer, scorers, lakehouse ingestion); waits until healthy."""
    from deploy import stack

    if flink_cluster and engine not in (None, "flink"):
        raise ConfigError(f"--flink-cluster runs the Flink engine's job; drop --engine {engine} or use --engine flink")
    settings = settings_from("up", engine="flink" if flink_cluster else engine, partitions=partitions, scorers=scorers, engine_workers=engine_workers,
                             brokers=brokers, stages=stages, home=home, pipeline=pipeline,
                             ingest=None if ingest is None else ("on" if ingest else "off"),
                             monitoring=None if monitoring is None else ("on" if monitoring else "off"),
                             insecure="on" if insecure else None)
    if distributed:
        flags = distributed_flags(settings.home, settings.brokers, settings.engine, settings.engine_workers)
        settings, spark_cluster, flink_cluster = settings.with_overrides(**flags), True, "flink_cluster" in flags
    else:
        if object_store:
            settings = settings.with_overrides(**local_store_flags(settings.home))
        if flink_cluster:
            settings = settings.with_overrides(**local_flink_flags(settings.home))
    export_store_environment(settings)
    with err.status("starting the stack..."):
        report = stack.up(settings, spark_cluster=spark_cluster, flink_cluster=flink_cluster)
    names = max(map(len, report.parts), default=0)
    addresses = max((len(part["address"]) for part in report.parts.values()), default=0)
    for name, part in report.parts.items():
        how = f"started in {part['start_s']}s" if part["start_s"] else ("running" if part["managed"] else "external")
        out.print(f"[green]up[/green]  {name:<{names}}  {part['address']:<{addresses}}  {how:<18} log: {part['log']}")
    if report.topics_created:
        out.print(f"created topics: {', '.join(report.topics_created)}")
    if report.baseline:
        out.print(f"published the baseline model {report.baseline} (no model had been published)")


@app.command()
def down(home: HomeOpt = None) -> None:
    """Stop everything `up` started, by recorded process id; data stays in EDDY_HOME."""
    from deploy import stack

    settings = settings_from("down", home=home)
    stopped = stack.down(settings)
    out.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """Each part: up or down, where it listens, memory, consumer lag."""
    from deploy import stack

    settings = settings_from("status", home=home, pipeline=pipeline)
    report = stack.status(settings)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    table = Table(title=f"eddy status ({report['home']})")
    for column in ("part", "state", "pid", "rss MB", "events/s", "detail"):
        table.add_column(column, overflow="fold")
    shown_elsewhere = {"state", "managed", "address", "pid", "rss_mb", "log", "events_per_s", "replicas", "note"}
    for name, part in report["parts"].items():
        facts = [part["address"]] if part["address"] else []
        if part.get("note"):
            facts.append(part["note"])
        facts += [f"{k}={v}" for k, v in part.items() if k not in shown_elsewhere and v not in (None, 0, "")]
        colour = "green" if part["state"] == "up" else "red"
        rate = part.get("events_per_s")
        table.add_row(name, f"[{colour}]{part['state']}[/{colour}]", str(part["pid"] or "-"),
                      str(part["rss_mb"] or "-"), f"{rate:,.0f}" if rate is not None else "-", "  ".join(facts))
    out.print(table)
    for group, topics in sorted(report.get("lag", {}).items()):
        out.print(f"lag {group}: " + ", ".join(f"{t}={n}" for t, n in sorted(topics.items())))


@app.command()
def produce(
    rate: Annotated[float | None, typer.Option("--rate", help="events/s with wall-clock event times (default: as fast as possible)")] = None,
    compressed: Annotated[bool, typer.Option("--compressed", help="event times 1 ms apart from now, for load tests (default: a backfill ending now at the cards' own rhythm)")] = False,
    count: Annotated[int, typer.Option("--count", help="number of events")] = 10_000,
    seed: Annotated[int, typer.Option("--seed", help="random seed; same seed and start give the same events")] = 0,
    fraud_rate: Annotated[float, typer.Option("--fraud-rate", help="fraction of fraudulent events")] = 0.01,
    label_delay: Annotated[float, typer.Option("--label-delay", help="seconds from an event to its label")] = 5.0,
    backfill: Annotated[str | None, typer.Option("--backfill", help="historical event times over this duration, e.g. 24h")] = None,
    start: Annotated[str | None, typer.Option("--start", help="ISO-8601 time of the first backfilled event (default: now - backfill)")] = None,
    cards: Annotated[int, typer.Option("--cards", help="number of distinct cards")] = 10_000,
    amount_scale: Annotated[float, typer.Option("--amount-scale", help="every amount times this: a shifted profile, to see drift")] = 1.0,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """Synthetic card transactions (and delayed labels) with a progress bar."""
    from deploy.produce import run_produce

    settings = settings_from("produce", home=home, pipeline=pipeline)
    report = run_produce(settings, out, rate=rate, count=count, seed=seed, fraud_rate=fraud_rate,
                         label_delay_s=label_delay, backfill=backfill, start=start, cards=cards,
                         amount_scale=amount_scale, compressed=compressed)
    out.print(f"produced {report.events} events ({report.frauds} fraudulent) and {report.labels} labels "
              f"in {report.seconds:.1f}s: {report.events_per_s:,.0f} events/s")


@app.command()
def consume(
    topic: Annotated[str, typer.Argument(help="topic to read")],
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="start at the oldest record")] = False,
    count: Annotated[int | None, typer.Option("--count", help="stop after N records")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per record")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="stop after this many idle seconds")] = None,
    home: HomeOpt = None,
) -> None:
    """Print the records of a topic (read_committed)."""
    from streams.consume import print_records

    settings = settings_from("consume", home=home)
    print_records(settings.kafka, topic, from_beginning=from_beginning, count=count, as_json=as_json,
                  idle_timeout_s=timeout, write=lambda line: print(line, flush=True))


features_app = typer.Typer(no_args_is_help=True, help="The online feature store (Feast over Redis).")
app.add_typer(features_app, name="features")
lakehouse_app = typer.Typer(no_args_is_help=True, help="Maintenance of the Delta tables.")
app.add_typer(lakehouse_app, name="lakehouse")


@features_app.command("get")
def features_get(
    entity_id: Annotated[str, typer.Argument(help="the entity's key, e.g. a card_id")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """The latest feature values of one entity, read through Feast's online store."""
    from deploy.components import feast_dir
    from features.feast_repo import online_row, open_feature_store, skip_torch_import
    from features.spec import load_spec

    skip_torch_import()  # this command never uses torch
    settings = settings_from("features", home=home, pipeline=pipeline)
    spec = load_spec(settings.pipeline)
    row = online_row(open_feature_store(feast_dir(settings)), spec, entity_id)
    if as_json:
        print(json.dumps({spec.key: entity_id, "features": row}))
        return
    width = max(len(name) for name in row)
    out.print(f"{spec.key} {entity_id}", markup=False, highlight=False)
    for name, value in row.items():
        out.print(f"  {name:<{width}}  {'null' if value is None else value}", markup=False, highlight=False)


@app.command()
def demo(home: HomeOpt = None) -> None:
    """The loop on a stack of its own (EDDY_HOME/demo, free ports), unattended; starts and stops it."""
    import shutil

    from deploy import stack
    from deploy.demo import run_demo

    base = settings_from("demo", home=home)
    demo_home = base.home / "demo"
    if demo_home.exists():  # the demo's own scratch space, fresh each run (stopped first if a run was cut short)
        stack.down(base.with_overrides(home=demo_home))
        shutil.rmtree(demo_home, ignore_errors=True)
    run_demo(stack.private_settings(base, demo_home), out)


@app.command()
def backfill(home: HomeOpt = None, pipeline: PipelineOpt = None) -> None:
    """Recompute every event's features in Spark from bronze into silver.features_backfill (retrain's point-in-time source)."""
    import time

    from deploy.lake import run_backfill
    from features.spec import load_spec

    settings = settings_from("backfill", home=home, pipeline=pipeline)
    started = time.monotonic()
    with err.status("recomputing features from the lakehouse's bronze table"):
        rows = run_backfill(settings, load_spec(settings.pipeline))
    out.print(f"silver.features_backfill: {rows:,} rows in {time.monotonic() - started:.1f}s")


@app.command()
def credentials(
    role: Annotated[str, typer.Argument(help="producer, reader or admin")],
    home: HomeOpt = None,
) -> None:
    """The path of ROLE's client file for the local secure broker (librdkafka properties: kcat -F PATH)."""
    from deploy.security import OUTSIDE_ROLES, clients_file, require_role

    settings = settings_from("credentials", home=home)
    path = clients_file(settings.home, require_role(role, OUTSIDE_ROLES))
    if not path.exists():
        raise EddyError(f"no credentials in {settings.home}: the local stack has not run secure there "
                        "(`eddy up`, without --insecure)")
    print(path)


@app.command()
def query(
    statement: Annotated[str, typer.Argument(help="a Spark SQL statement over bronze.*, silver.*, gold.*")],
    fmt: Annotated[str, typer.Option("--format", help="table, json (one object per line) or csv")] = "table",
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """Spark SQL over the lakehouse tables (bronze.transactions, silver.features, gold.predictions, ...)."""
    from deploy.lake import spark_session
    from features.errors import ConfigError
    from features.spec import load_spec
    from lakehouse.query import FORMATS, register_tables, render, run_sql

    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    settings = settings_from("query", home=home, pipeline=pipeline)
    spec = load_spec(settings.pipeline)
    with err.status("starting Spark..."):
        session = spark_session(settings, "eddy-query")
        register_tables(session, settings.lakehouse, spec)
    with err.status("running the query..."):
        result = run_sql(session, statement)
    sys.stdout.write(render(result, fmt))


@lakehouse_app.command("optimize")
def lakehouse_optimize(home: HomeOpt = None, pipeline: PipelineOpt = None) -> None:
    """Compact the small files of every table (safe while ingestion runs)."""
    from deploy.lake import spark_session
    from features.spec import load_spec
    from lakehouse.query import optimize

    settings = settings_from("lakehouse", home=home, pipeline=pipeline)
    spec = load_spec(settings.pipeline)
    with err.status("starting Spark..."):
        session = spark_session(settings, "eddy-optimize")
    for name, files in optimize(session, settings.lakehouse, spec).items():
        out.print(f"{name:<22} compacted {files['files_removed']} files into {files['files_added']}")


@lakehouse_app.command("vacuum")
def lakehouse_vacuum(
    retain: Annotated[float, typer.Option("--retain", help="hours of history to keep (at least 1)")] = 168.0,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """Delete files that no table version younger than --retain hours needs (safe while ingestion runs)."""
    from deploy.lake import spark_session
    from features.spec import load_spec
    from lakehouse.query import check_retain, vacuum

    check_retain(retain)
    settings = settings_from("lakehouse", home=home, pipeline=pipeline)
    spec = load_spec(settings.pipeline)
    with err.status("starting Spark..."):
        session = spark_session(settings, "eddy-vacuum")
    for name, deleted in vacuum(session, settings.lakehouse, spec, retain).items():
        out.print(f"{name:<22} deleted {deleted} files older than {retain:g} h")


@app.command(hidden=True)
def run(component: Annotated[str, typer.Argument(help="component to run in this process")]) -> None:
    """Run one component of the stack in the foreground (what `eddy up` starts)."""
    from deploy import supervisor
    from deploy.components import COMPONENTS, component_named

    component = component_named(component)  # features-native-0: features-native (a StatefulSet's pod 0)
    if component not in COMPONENTS and component != supervisor.NAME:
        raise typer.BadParameter(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}, supervisor")
    settings = settings_from(component)
    if component == supervisor.NAME:
        supervisor.run_supervisor(settings)
    else:
        COMPONENTS[component].run(settings, settings.pipeline_spec())


def main(argv: list[str] | None = None) -> None:
    """Console entry point. A bad flag or setting is one line `eddy: error: ...` and exit status 2;
    any other EddyError one line and status 1; never a traceback or a boxed panel for either."""
    # typer bundles its own click (typer._click): its errors are not the click package's
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="eddy", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # `eddy` or `eddy GROUP` alone: the help
        print(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(0)
    except UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", 2)
    except ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except EddyError as exc:
        _fail(str(exc), 1)
    except KafkaException as exc:
        _fail(f"Kafka: {exc.args[0].str()}; is the broker up (`eddy up`, `eddy status`)?", 1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, status: int) -> None:
    err.print(f"eddy: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
