"""The Flink job's entry point on a Flink cluster: settings from EDDY_* as everywhere, Flink specifics
(parallelism, state backend, checkpoint storage) from the cluster's own configuration.

`flink run -pym deploy.flink_main -pyfs eddy.zip -pyexec PYTHON -pypath SITE_PACKAGES [-s CHECKPOINT]
-- [--checkpoints URI]`, with streams/, features/ and deploy/ zipped into eddy.zip."""

from __future__ import annotations

import argparse
import sys

from deploy.components import engine_config
from deploy.settings import load_settings
from features.spec import load_spec
from streams.engines.flink_job import build_job


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="flink_main")
    parser.add_argument("--checkpoints", help="checkpoint storage URI (default: the cluster's)")
    args = parser.parse_args(argv)
    settings = load_settings()
    config = engine_config(settings, load_spec(settings.pipeline))
    build_job(config, cluster=True, checkpoints=args.checkpoints).execute(config.app_id)


if __name__ == "__main__":
    main(sys.argv[1:])
