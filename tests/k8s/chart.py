"""What the chart tests share: helm itself (skipping, or failing on CI, without it), a render per spec and
values profile, and the objects, pods and containers in a render."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.k8s.values_from_spec import chart_values
from features.spec import PipelineSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
CHART = Path(os.environ.get("EDDY_K8S_CHART", REPO / "deploy" / "helm" / "eddy"))
HELM = REPO / ".tools" / "bin" / "helm"
KUBE_VERSION = re.search(r"^K8S_VERSION=v([0-9.]+)", (REPO / "deploy/k8s/tools.sh").read_text(), re.M)[1]  # type: ignore[index]
PROFILES = sorted(p.name.removesuffix("-values.yaml") for p in (REPO / "deploy/helm/eddy/ci").glob("*-values.yaml"))
SPECS = ("fraud", "sensors")
METRICS_PORT = 9400
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY($|_)|AUTH")

if not HELM.exists():
    reason = "helm is not installed: deploy/k8s/tools.sh (run by make k8s-check) builds it into .tools/bin"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@cache
def spec(name: str) -> PipelineSpec:
    return load_spec(REPO / "pipelines" / f"{name}.yaml")


def helm_template(spec_name: str, profile: str, *sets: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart for the spec and the profile, with `--set` of each of `sets`."""
    path = REPO / "pipelines" / f"{spec_name}.yaml"
    values = chart_values(spec(spec_name), path.read_text(encoding="utf-8"), path.name)
    return subprocess.run(
        [str(HELM), "template", "eddy", str(CHART), "--namespace", "eddy", "--kube-version", KUBE_VERSION, "-f", "-",
         "-f", str(REPO / "deploy/helm/eddy/ci" / f"{profile}-values.yaml"), *(a for x in sets for a in ("--set", x))],
        input=yaml.safe_dump(values), capture_output=True, text=True, timeout=60, check=False)


@cache
def rendered(spec_name: str, profile: str) -> tuple[dict[str, Any], ...]:
    out = helm_template(spec_name, profile)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) of each pod a workload object makes."""
    kind, name, spec_ = doc["kind"], doc["metadata"]["name"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet"):
        yield f"{kind}/{name}", spec_["template"]["metadata"], spec_["template"]["spec"]
    elif kind == "CronJob":
        template = spec_["jobTemplate"]["spec"]["template"]
        yield f"{kind}/{name}", template["metadata"], template["spec"]
    elif kind == "FlinkDeployment":
        yield f"{kind}/{name}", spec_["podTemplate"]["metadata"], spec_["podTemplate"]["spec"]
    elif kind == "SparkApplication":
        for side in ("driver", "executor"):
            part = spec_[side]
            pod = {"securityContext": part["podSecurityContext"],
                   "containers": [{"name": f"spark-{side}", "image": spec_["image"], "env": part.get("env", []),
                                   "securityContext": part["securityContext"],
                                   "volumeMounts": part.get("volumeMounts", [])}],
                   "initContainers": part.get("initContainers", []), "volumes": spec_.get("volumes", [])}
            yield f"{kind}/{name}:{side}", {"labels": part.get("labels", {})}, pod


def workloads(docs: tuple[dict, ...]) -> list[tuple[str, dict, dict]]:
    return [w for d in docs for w in pod_specs(d)]


def all_renders() -> list[tuple[str, str]]:
    return [(s, p) for s in SPECS for p in PROFILES]


def is_eddy_stage(meta: dict) -> bool:
    return "eddy.io/role" in meta.get("labels", {})


# ---------------------------------------------------------------------------------------------
# Hygiene, for every workload of every profile


def acls(docs: tuple[dict, ...]) -> dict[str, list[dict]]:
    return {d["metadata"]["labels"]["eddy.io/role"]: d["spec"]["authorization"]["acls"]
            for d in of_kind(docs, "KafkaUser")}
