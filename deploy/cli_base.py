"""What every `eddy` command module shares: the Typer app and its groups, the consoles, the common
options, and the settings of a CLI process."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from deploy.environment import export_store_environment
from deploy.logs import setup_logging
from deploy.settings import Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="eddy: event-driven streaming ML (Kafka -> features -> PyTorch scoring -> Delta).")
rollout_app = typer.Typer(no_args_is_help=True, help="Progressive delivery: shadow, canary, promotion, rollback.")
app.add_typer(rollout_app, name="rollout", rich_help_panel="Models")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

HomeOpt = Annotated[str | None, typer.Option("--home", help="state directory (EDDY_HOME)")]
PipelineOpt = Annotated[str | None, typer.Option("--pipeline", help="pipeline spec (EDDY_PIPELINE)")]
StagesOpt = Annotated[str | None, typer.Option("--stages", help="the online path: fused (one process and one transaction "
                                               "per batch; native engine), split (engine, online writer and scorers "
                                               "apart) or auto (the default: fused with the native engine and one "
                                               "scorer, else split) (EDDY_STAGES)")]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="local broker and Redis in plaintext, with no "
                                           "credentials or ACLs (EDDY_INSECURE; for benchmarks only)")]


def settings_from(process: str, **flags: Any) -> Settings:
    """The Settings of this CLI process (flags over EDDY_* variables over defaults), with logging set
    up for `process`; ConfigError names a bad flag or variable."""
    settings = load_settings(flags)
    export_store_environment(settings)  # delta-rs and Spark in this process find the lakehouse's store
    setup_logging(settings.logs_dir, process)
    return settings


def metric(value) -> str:
    """A figure in a table: three decimals, or - when there is none."""
    return "-" if value is None else f"{value:.3f}"
