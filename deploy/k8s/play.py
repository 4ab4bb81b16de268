"""The chart's own stages run for real with `podman kube play`: the rendered Deployments of the feature
engine, the online writer and a scorer, from eddy's image, against a broker and Redis on this host.
Events go in, predictions come out, each exactly once.

    python -m deploy.k8s.play [--image localhost/eddy:0.1.0] [--events 10000]

What podman cannot do as a kubelet would is done here, and only here: the $(VAR) references in env
and args are expanded, the StatefulSets (the engine's workers, the scorers) become Deployments with
index 0, the pods share the host's network (the local broker advertises a loopback address), the
shared artifacts volume is a host path, secrets are filled in from throwaway values, and the probes
are dropped (podman runs HTTP probes with curl inside the container, and the stages' /ready and
/metrics are not there yet)."""

from __future__ import annotations

import argparse
import copy
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import yaml

from deploy.access import ROLES
from deploy.k8s.values_from_spec import chart_values
from features.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / ".tools" / "bin" / "helm"
CHART = REPO / "deploy" / "helm" / "eddy"
STAGES = ("features-native", "online-writer", "scorer")
_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def play_values(bootstrap: str, redis_port: int, lakehouse: Path, image: str, trusted: str) -> dict[str, Any]:
    """Chart values for one machine: the host's broker and Redis as the external ones, no operators."""
    repository, _, tag = image.rpartition(":")
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "kafka": {"mode": "external", "topics": {"partitions": 3}, "external": {"bootstrap": bootstrap}},
        "redis": {"mode": "external", "existingSecret": "eddy-redis-users",
                  "external": {"host": "127.0.0.1", "port": redis_port}},
        "modelKey": {"existingSecret": "eddy-model-key", "trusted": trusted},
        "objectStorage": {"lakehouse": str(lakehouse)},
        "artifacts": {"claimName": "eddy-artifacts"},
        "engine": {"type": "native"},
        "scorer": {"autoscaling": {"enabled": False}, "replicas": 1, "device": "cpu"},
        "lakehouse": {"enabled": False},
        "retrain": {"mode": "off"},
        "maintenance": {"optimize": {"enabled": False}, "vacuum": {"enabled": False}},
        "networkPolicy": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "monitoring": {"podMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
                       "dashboards": {"enabled": False}},
    }


def render(spec_path: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    spec_values = chart_values(load_spec(spec_path), spec_path.read_text(encoding="utf-8"), spec_path.name)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, doc in enumerate((spec_values, values)):
            files += ["-f", str(Path(tmp) / f"{i}.yaml")]
            Path(files[-1]).write_text(yaml.safe_dump(doc))
        out = subprocess.run([str(HELM), "template", "eddy", str(CHART), "--kube-version", "1.34.0", *files],
                             capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def metrics_port(component: str) -> int:
    """Where a played stage serves /metrics and /ready on the host's network."""
    return 19400 + STAGES.index(component)


def wait_ready(timeout_s: float) -> dict[str, float]:
    """Seconds until each stage's /ready answered 200 (it does once the stage reaches Kafka)."""
    import urllib.error

    start, ready = time.monotonic(), dict[str, float]()
    while len(ready) < len(STAGES) and time.monotonic() - start < timeout_s:
        for stage in STAGES:
            if stage in ready:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(stage)}/ready", timeout=2) as answer:
                    if answer.status == 200:
                        ready[stage] = round(time.monotonic() - start, 1)
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(1)
    return ready


def _expand(text: str, env: dict[str, str]) -> str:
    return _REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def for_podman(docs: list[dict[str, Any]], secret_values: dict[str, dict[str, str]], lakehouse: Path,
               work: Path) -> list[dict[str, Any]]:
    """The stages' Deployments and the spec ConfigMap, shaped for podman kube play; the values of the
    secretKeyRefs are filled in (podman 4.3 reads its own secrets as JSON, not a Secret's keys)."""
    out: list[dict[str, Any]] = []
    for doc in docs:
        component = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-spec"):
            out.append(doc)
        if doc["kind"] not in ("Deployment", "StatefulSet") or not any(component == s for s in STAGES):
            continue
        d = copy.deepcopy(doc)
        d["kind"], d["spec"]["replicas"] = "Deployment", 1
        for key in ("serviceName", "podManagementPolicy"):
            d["spec"].pop(key, None)
        pod = d["spec"]["template"]["spec"]
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "artifacts"] + [
            {"name": "artifacts", "hostPath": {"path": str(work), "type": "Directory"}},
            {"name": "lakehouse", "hostPath": {"path": str(lakehouse), "type": "Directory"}}]
        for c in pod["containers"]:
            for field in ("startupProbe", "readinessProbe", "livenessProbe", "ports"):  # host network: no mappings
                c.pop(field, None)
            literal = {"EDDY_SCORER_INDEX": "0", "EDDY_WORKER_INDEX": "0"}  # pod 0 of each StatefulSet
            for e in c["env"]:
                if e["name"] == "EDDY_METRICS_PORT":  # one host network: a port per stage
                    e["value"] = str(metrics_port(component))
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    literal[e["name"]] = secret_values[ref["name"]][ref["key"]]
                elif "value" in e:
                    literal[e["name"]] = _expand(e["value"], literal)
            c["env"] = [{"name": e["name"], "value": literal[e["name"]]} for e in c["env"]]
            c["args"] = [_expand(a, literal) for a in c["args"]]
            c["volumeMounts"].append({"name": "lakehouse", "mountPath": str(lakehouse), "readOnly": True})
        out.append(d)
    return out


def _ids(messages: list[Any], id_field: str) -> list[str]:
    values = [m.value() for m in messages if m.error() is None]
    return [str(orjson.loads(v)[id_field]) for v in values if v]


def predictions(bootstrap: str, topic: str, id_field: str, want: int, timeout_s: float) -> list[str]:
    """The event ids of the committed predictions, read until `want` came or `timeout_s` passed."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"eddy-play-{secrets.token_hex(4)}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "isolation.level": "read_committed"})
    consumer.subscribe([topic])
    ids: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(ids) < want and time.monotonic() < deadline:
            ids += _ids(consumer.consume(10_000, 1.0), id_field)
        ids += _ids(consumer.consume(10_000, 5.0), id_field)  # anything past `want` is a duplicate: look for one
    finally:
        consumer.close()
    return ids


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.k8s.play")
    parser.add_argument("--image", default="localhost/eddy:0.1.0")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the predictions")
    parser.add_argument("--keep", action="store_true", help="leave the pods and the stack up")
    args = parser.parse_args(argv)

    from deploy import stack
    from deploy.environment import inherited_environment
    from deploy.processes import free_port
    from deploy.settings import load_settings
    from models.updates import ensure_baseline

    spec_path = REPO / "pipelines" / "fraud.yaml"
    spec = load_spec(spec_path)
    home = Path(tempfile.mkdtemp(prefix="eddy-play-"))
    lakehouse, work = home / "lakehouse", home / "work"
    work.mkdir(parents=True)
    key = secrets.token_hex(32)
    env = {"EDDY_HOME": str(home), "EDDY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
           "EDDY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "EDDY_PIPELINE": str(spec_path),
           "EDDY_MODEL_KEY": key, "EDDY_LAKEHOUSE": str(lakehouse), "EDDY_INGEST": "off",
           # the pods reach this stack through the host's network as the chart's external cluster, in plaintext
           "EDDY_INSECURE": "on"}
    settings = load_settings(environ=env)
    manifest = home / "play.yaml"
    podman_env = inherited_environment({"CONTAINERS_CONF": str(REPO / "deploy/image/containers.conf")})
    t0 = time.monotonic()
    try:
        stack.up(settings, with_components=False)
        print(f"[play] broker {settings.kafka.bootstrap}, Redis {env['EDDY_REDIS_URL']}, home {home}", flush=True)
        ensure_baseline(settings.kafka, spec, settings.artifacts, settings.signing_key())
        for path in (home, lakehouse, *lakehouse.rglob("*")):  # the pods' user (10001) reads the artifacts
            path.chmod(path.stat().st_mode | 0o055)
        passwords = {role: secrets.token_hex(16) for role in ROLES}
        import redis

        r = redis.Redis.from_url(env["EDDY_REDIS_URL"])
        for role, password in passwords.items():  # the ACL users the chart's stages log in as
            r.acl_setuser(role, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                          categories=["+@all"])
        port = int(env["EDDY_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        docs = render(spec_path, play_values(settings.kafka.bootstrap, port, lakehouse, args.image,
                                        ",".join(settings.signing_key().public_hex())))
        played = for_podman(docs, {"eddy-redis-users": passwords, "eddy-model-key": {"model-key": key}},
                            lakehouse, work)
        manifest.write_text(yaml.safe_dump_all(played, sort_keys=False))
        print(f"[play] podman kube play {manifest}: "
              + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in played), flush=True)
        subprocess.run(["podman", "kube", "play", "--network", "host", str(manifest)], check=True, env=podman_env,
                       stdout=subprocess.DEVNULL)
        ready = wait_ready(240)
        print(f"[play] /ready answered 200 after (s): {ready}", flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port('scorer')}/metrics", timeout=5) as answer:
            lines = answer.read().decode().splitlines()
        print(f"[play] scorer /metrics: {sum(1 for x in lines if x and not x.startswith('#'))} samples", flush=True)
        produce = subprocess.run([sys.executable, "-m", "deploy.cli", "produce", "--count", str(args.events)],
                                 env=inherited_environment(env), cwd=REPO, capture_output=True, text=True, check=True)
        print(f"[play] {produce.stdout.strip().splitlines()[-1]}", flush=True)
        ids = predictions(settings.kafka.bootstrap, spec.topics.predictions, spec.id_field, args.events, args.timeout)
        print(f"[play] {len(ids)} predictions, {len(set(ids))} distinct events, "
              f"{time.monotonic() - t0:.0f} s from start", flush=True)
        ok = len(ids) == len(set(ids)) == args.events
        if not ok:
            for d in played:
                if d["kind"] == "Deployment":
                    name = f"{d['metadata']['name']}-pod-{d['spec']['template']['spec']['containers'][0]['name']}"
                    logs = subprocess.run(["podman", "logs", "--tail", "20", name], capture_output=True, text=True,
                                          env=podman_env)
                    print(f"--- {name}\n{logs.stdout}{logs.stderr}", flush=True)
        return 0 if ok else 1
    finally:
        if not args.keep:
            subprocess.run(["podman", "kube", "down", str(manifest)], capture_output=True, env=podman_env)
            stack.down(settings)
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
