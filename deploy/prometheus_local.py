"""The local Prometheus of `eddy up --monitoring`: Debian's prometheus on a free loopback port, scraping
every stage through the file_sd targets the stages write under run/targets/, with eddy's recording and
alerting rules loaded."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.environment import child_environment
from deploy.processes import ProcessTable, free_port
from deploy.settings import REPO_ROOT, Settings
from features.errors import ServiceError
from features.spec import parse_duration

NAME = "prometheus"
RULES_DIR = REPO_ROOT / "deploy" / "monitoring" / "rules"
SCRAPE_INTERVAL_S = 5   # the rules' 1-minute rates want at most 15 s; 5 s makes tests and the demo quick
START_DEADLINE_S = 60.0


@dataclass(frozen=True)
class PrometheusInfo:
    url: str
    pid: int | None
    start_s: float = 0.0


def targets_dir(settings: Settings) -> Path:
    """Where each stage writes its scrape target (streams.telemetry.MetricsServer)."""
    return settings.run_dir / "targets"


def rule_files(settings: Settings, root: Path) -> list[str]:
    """eddy's rule files; with EDDY_ALERT_FOR, copies under `root` whose alerts hold at most that long
    before they fire (for trying an alert, and for tests: the rules' own holds are minutes)."""
    files = sorted(RULES_DIR.glob("*.yml"))
    if settings.alert_for_s is None:
        return [str(p) for p in files]
    (root / "rules").mkdir(parents=True, exist_ok=True)
    out = []
    for path in files:
        rules = yaml.safe_load(path.read_text())
        for group in rules.get("groups", []):
            for rule in group.get("rules", []):
                if "alert" in rule and _seconds_of(rule.get("for", "0s")) > settings.alert_for_s:
                    rule["for"] = f"{int(settings.alert_for_s)}s"
        copy = root / "rules" / path.name
        copy.write_text(yaml.safe_dump(rules, sort_keys=False))
        out.append(str(copy))
    return out


def _seconds_of(duration: str) -> float:
    return parse_duration(duration) / 1000


def config(settings: Settings, rules: list[str] | None = None) -> dict[str, Any]:
    """prometheus.yml: every eddy target found under run/targets/, eddy's rules (or `rules`)."""
    return {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": rules if rules is not None else [str(p) for p in sorted(RULES_DIR.glob("*.yml"))],
        "scrape_configs": [{
            "job_name": "eddy",  # each target file names its own job (eddy-<stage>), which wins
            "file_sd_configs": [{"files": [str(targets_dir(settings) / "*.json")], "refresh_interval": "5s"}],
            "honor_labels": True,
        }],
    }


def url_of(settings: Settings, table: ProcessTable) -> str | None:
    """The running local Prometheus's base URL, or None."""
    record = table.get(NAME)
    return f"http://{record.address}" if record is not None and record.alive() else None


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ensure_prometheus(settings: Settings, table: ProcessTable) -> PrometheusInfo:
    """Start the local Prometheus unless it runs; ServiceError naming the fix when it cannot."""
    record = table.get(NAME)
    if record is not None and record.alive():
        return PrometheusInfo(f"http://{record.address}", record.pid)
    binary = shutil.which("prometheus")
    if binary is None:
        raise ServiceError("prometheus is not installed: run `make setup` (it installs Debian's prometheus)")
    root = settings.home / "prometheus"
    (root / "data").mkdir(parents=True, exist_ok=True)
    targets_dir(settings).mkdir(parents=True, exist_ok=True)
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config(settings, rule_files(settings, root)), sort_keys=False))
    address = f"127.0.0.1:{free_port()}"
    record = table.start(NAME, [binary, f"--config.file={path}", f"--storage.tsdb.path={root / 'data'}",
                                f"--web.listen-address={address}", "--web.enable-lifecycle",
                                "--storage.tsdb.retention.time=2d"],
                         child_environment(settings), address=address)
    took = table.wait_healthy(record, lambda: ready(f"http://{address}"), START_DEADLINE_S, "prometheus")
    return PrometheusInfo(f"http://{address}", record.pid, took)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector; ServiceError with Prometheus's error when it refuses it."""
    from urllib.parse import urlencode

    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{urlencode({'query': expr})}", timeout=10) as answer:
            body = answer.read()
    except urllib.error.HTTPError as exc:
        raise ServiceError(f"prometheus refused {expr!r}: {exc.read().decode(errors='replace')[:300]}") from None
    data = json.loads(body)
    if data.get("status") != "success":
        raise ServiceError(f"prometheus refused {expr!r}: {data.get('error')}")
    return data["data"]["result"]
