"""The model commands of `eddy`: retrain, the registry (models, promote, rollback, model-key), drift,
and progressive delivery (`eddy rollout ...`)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from deploy.cli_base import HomeOpt, PipelineOpt, app, err, metric, out, rollout_app, settings_from
from features.errors import EddyError

PANEL = "Models"  # where `eddy --help` lists these


@app.command(rich_help_panel=PANEL)
def retrain(
    publish_mode: Annotated[str, typer.Option("--publish", help="auto (when better), always or never")] = "auto",
    epochs: Annotated[int, typer.Option("--epochs", help="training epochs")] = 8,
    source: Annotated[str, typer.Option("--source", help="lakehouse (silver/features + bronze/labels) or topics")] = "lakehouse",
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """Train on the labelled rows, evaluate against the serving model, register in gold/models, publish when better."""
    from deploy.lake import lakehouse_rows
    from features.errors import ConfigError
    from features.spec import load_spec
    from lakehouse.registry import register_model
    from models.retrain import retrain as run_retrain
    from models.rollout import load_policy

    if source not in ("lakehouse", "topics"):
        raise ConfigError(f"--source: {source!r} is not lakehouse or topics")
    settings = settings_from("retrain", home=home, pipeline=pipeline)
    spec = load_spec(settings.pipeline)
    policy = load_policy(settings.rollout_policy) if settings.rollout_policy else None
    with err.status("retraining...") as spinner:
        result = run_retrain(settings.kafka, spec, settings.artifacts, settings.signing_key(),
                             settings.device, publish_mode, epochs=epochs,
                             on_progress=lambda line: spinner.update(f"retraining: {line}"),
                             rows=lakehouse_rows(settings, spec) if source == "lakehouse" else None,
                             register=lambda entry: register_model(settings.lakehouse, entry), rollout_policy=policy)
    new, old = result.metrics, result.champion_metrics or {}
    out.print(f"trained {result.version} on {result.rows:,} labelled rows ({result.positives} fraud) in "
              f"{result.seconds:.1f}s")
    if result.unjoined_labels:
        out.print(f"{result.unjoined_labels:,} labels joined no features row yet (their events' rows have not "
                  "landed, or no event has their id); they are kept, and a later retrain joins them")
    out.print(f"holdout PR-AUC {new['pr_auc']} (champion {result.champion}: {old.get('pr_auc')}), "
              f"ROC-AUC {new['roc_auc']} ({old.get('roc_auc')}), "
              f"recall@90%precision {new['recall_at_precision_90']} ({old.get('recall_at_precision_90')})")
    if result.rollout is not None:
        from deploy.rollouts import record

        record(settings, result.rollout, "start", f"by eddy retrain: steps {list(result.rollout.steps)}",
               {"policy": result.rollout.policy})
        out.print(f"rollout {result.rollout.rollout_id} started: {result.version} at {result.rollout.percent}% "
                  f"({result.rollout.mode}) against {result.champion}; `eddy rollout status` follows it")
    elif result.refused is not None:  # trained and registered, but kept off the topic: say why, fail
        raise EddyError(f"{result.version} not published: {result.refused}")
    elif policy is not None and publish_mode == "auto" and not result.published and result.version:
        out.print(f"not published (--publish auto: not better than {result.champion}, or a rollout is in progress)")
    else:
        out.print(f"published {result.version} on {spec.topics.model_updates}" if result.published
                  else f"not published (--publish {publish_mode})")


@app.command(rich_help_panel=PANEL)
def models(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """The model versions with their holdout metrics, and which one serves."""
    from features.spec import load_spec
    from models.registry import list_models

    settings = settings_from("models", home=home, pipeline=pipeline)
    rows = list_models(settings.kafka, load_spec(settings.pipeline), settings.artifacts,
                       settings.trusted_keys(), lakehouse_root=settings.lakehouse)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="models (holdout: at training; live: gold.predictions joined with the labels so far)")
    for column in ("version", "serves", "parent", "holdout PR-AUC", "live labelled", "live PR-AUC",
                   "live ROC-AUC", "live prec@0.5"):
        table.add_column(column, no_wrap=column == "version")
    for m in rows:
        live = m.get("live") or {}
        table.add_row(m["version"], "*" if m["serving"] else "", str(m["parent"] or "-"),
                      metric(m["metrics"].get("pr_auc")), f"{live['labelled']:,}" if live else "-",
                      metric(live.get("pr_auc")), metric(live.get("roc_auc")), metric(live.get("precision_at_0.5")))
    out.print(table)


@app.command("model-key", rich_help_panel=PANEL)
def model_key(home: HomeOpt = None) -> None:
    """The public half of the model key, for EDDY_MODEL_TRUST where models are served (the key id on stderr)."""
    key = settings_from("model-key", home=home).signing_key()
    print(key.public_hex()[0])
    print(f"key id {key.id}", file=sys.stderr)


@app.command(rich_help_panel=PANEL)
def drift(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """Feature drift of the serving version: PSI of each feature and of the score over the scorers'
    live window against the training reference, and the share of nulls."""
    from features.spec import load_spec
    from models.drift import DRIFT_BOUND, measures, merged_snapshot
    from streams.stores import redis_client

    settings = settings_from("drift", home=home, pipeline=pipeline)
    spec = load_spec(settings.pipeline)
    merged = merged_snapshot(redis_client(settings.redis_url), spec.name)
    figures = None if merged is None else {**measures(merged), "replicas": merged["replicas"], "bound": DRIFT_BOUND}
    if as_json:
        print(json.dumps(figures, indent=2, default=str))
        return
    if figures is None:
        out.print("no drift measured yet: the serving version has no training reference (the baseline has none; "
                  "the first `eddy retrain` records one) or no scorer has reported in the last 5 minutes")
        return
    table = Table(title=f"drift of {figures['version']} over the last {figures['rows']:,} rows "
                        f"({figures['replicas']} scorer(s)); PSI above {DRIFT_BOUND} is a shift worth acting on")
    for column in ("feature", "PSI", "null share", "at training", ""):
        table.add_column(column)
    for name, f in figures["features"].items():
        table.add_row(name, metric(f["psi"]), metric(f["null_share"]), metric(f["ref_null_share"]),
                      "drifted" if (f["psi"] or 0) > DRIFT_BOUND else "")
    table.add_row("(score)", metric(figures["score_psi"]), "", "",
                  "drifted" if (figures["score_psi"] or 0) > DRIFT_BOUND else "")
    out.print(table)


@app.command(rich_help_panel=PANEL)
def promote(
    version: Annotated[str, typer.Argument(help="the version to serve")],
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """Serve this version now (published on the model-updates topic)."""
    from features.spec import load_spec
    from models.registry import promote as run_promote

    settings = settings_from("promote", home=home, pipeline=pipeline)
    run_promote(settings.kafka, load_spec(settings.pipeline), settings.artifacts, settings.signing_key(),
                version)
    out.print(f"published {version}; scorers swap to it between batches")


@app.command(rich_help_panel=PANEL)
def rollback(home: HomeOpt = None, pipeline: PipelineOpt = None) -> None:
    """Serve again the version that served before the current one."""
    from features.spec import load_spec
    from models.registry import rollback as run_rollback

    settings = settings_from("rollback", home=home, pipeline=pipeline)
    previous = run_rollback(settings.kafka, load_spec(settings.pipeline), settings.artifacts,
                            settings.signing_key())
    out.print(f"rolled back to {previous}")



@rollout_app.command("start")
def rollout_start(
    version: Annotated[str, typer.Argument(help="the challenger: a version `eddy models` lists")],
    shadow: Annotated[bool, typer.Option("--shadow", help="score every event in shadow first (step 0)")] = False,
    steps: Annotated[str | None, typer.Option("--steps", help="percent of entities per step, e.g. 10,30,100")] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="a YAML policy file (docs/operations.md)")] = None,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """Roll VERSION out against the serving version, step by step, judged on live labelled predictions."""
    from deploy.rollouts import start
    from features.spec import load_spec

    settings = settings_from("rollout start", home=home, pipeline=pipeline)
    route = start(settings, load_spec(settings.pipeline), version, shadow=shadow, steps=steps,
                  policy_file=policy or (str(settings.rollout_policy) if settings.rollout_policy else None))
    out.print(f"rollout {route.rollout_id}: {route.challenger} {route.mode} at {route.percent}% against "
              f"{route.champion}; steps {list(route.steps)}")


@rollout_app.command("status")
def rollout_status(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
    home: HomeOpt = None,
    pipeline: PipelineOpt = None,
) -> None:
    """The rollout in progress: step, weights, both versions' live figures since the step began, decisions."""
    from deploy.rollouts import status
    from features.spec import load_spec
    from streams.stores import redis_client

    settings = settings_from("rollout status", home=home, pipeline=pipeline)
    report = status(settings, load_spec(settings.pipeline), redis_client(settings.redis_url))
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    if report["mode"] == "none":
        out.print(f"no rollout in progress; {report['champion']} serves")
    else:
        out.print(f"rollout {report['rollout']['id']}: {report['challenger']} {report['mode']} at "
                  f"{report['rollout']['weight']:.0%} (step {report['step'] + 1} of {len(report['steps'])}: "
                  f"{report['steps']}) against {report['champion']}; next: {report['next']['action']}, "
                  f"{report['next']['reason']}")
        table = Table(title="labelled live predictions of the same events (each served by one version, scored in shadow "
                            "by the other) since this step began; rows and refusals: the scorers' counts since they started")
        for column in ("version", "labelled", "positives", "PR-AUC", "precision@0.5", "rows scored", "refused"):
            table.add_column(column)
        for who in ("champion", "challenger"):
            f = report["metrics"].get(who, {})
            table.add_row(f"{report[who]} ({who})", f"{f.get('labelled', 0):,}", str(f.get("positives", 0)),
                          metric(f.get("pr_auc")), metric(f.get("precision")), f"{int(f.get('rows') or 0):,}",
                          str(int(f.get("refused") or 0)))
        out.print(table)
    for d in report["decisions"][-10:]:
        out.print(f"{d['decided_at']:%Y-%m-%d %H:%M:%S} {d['challenger']} step {d['percent']}%: {d['decision']}: "
                  f"{d['reason']}")


@rollout_app.command("promote")
def rollout_promote(home: HomeOpt = None, pipeline: PipelineOpt = None) -> None:
    """End the rollout in progress: the challenger serves every entity from the scorers' next batch."""
    from deploy.rollouts import end
    from features.spec import load_spec

    settings = settings_from("rollout promote", home=home, pipeline=pipeline)
    route = end(settings, load_spec(settings.pipeline), "promoted", "promoted by hand")
    out.print(f"{route.challenger} promoted: it serves every entity; {route.champion} is retired")


@rollout_app.command("abort")
def rollout_abort(home: HomeOpt = None, pipeline: PipelineOpt = None) -> None:
    """End the rollout in progress: the champion serves alone from the scorers' next batch."""
    from deploy.rollouts import end
    from features.spec import load_spec

    settings = settings_from("rollout abort", home=home, pipeline=pipeline)
    route = end(settings, load_spec(settings.pipeline), "aborted", "aborted by hand")
    out.print(f"rollout of {route.challenger} aborted: {route.champion} serves alone")
