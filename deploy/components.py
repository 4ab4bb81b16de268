"""The long-running parts `eddy up` starts beside the broker and Redis, each as `eddy run NAME`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from deploy.settings import Settings
from features.spec import PipelineSpec
from streams.engines.config import EngineConfig


@dataclass(frozen=True)
class Component:
    name: str
    run: Callable[[Settings, PipelineSpec], None]   # runs in the component's own process until SIGTERM
    engine: str | None = None                        # only started with this --engine


def engine_config(settings: Settings, spec: PipelineSpec, **overrides) -> EngineConfig:
    return EngineConfig(kafka=settings.kafka, spec=spec, redis_url=settings.redis_url,
                        data_dir=settings.home / "engines" / settings.engine, partitions=settings.partitions,
                        jars_dir=settings.jars_dir, **overrides)


def _faust(settings: Settings, spec: PipelineSpec) -> None:
    from streams.engines.faust_engine import run_worker

    config = engine_config(settings, spec)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    sys.argv = [sys.argv[0], "worker"]  # Faust's worker parses argv
    run_worker(config)


COMPONENTS: dict[str, Component] = {
    c.name: c for c in (
        Component("features-faust", _faust, engine="faust"),
    )
}


def wanted(settings: Settings) -> list[Component]:
    """The components this stack runs, in start order."""
    return [c for c in COMPONENTS.values() if c.engine in (None, settings.engine)]


def argv(name: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", "run", name]
