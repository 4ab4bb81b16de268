"""Logging for every eddy process: one file per process under EDDY_HOME/logs."""

from __future__ import annotations

import logging
from pathlib import Path


def setup_logging(logs_dir: Path, process: str, level: int = logging.INFO) -> Path:
    """Send this process's log records to logs/<process>.log; returns the path."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / f"{process}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return path
