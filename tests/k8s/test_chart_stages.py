"""The chart's feature stage: the native engine as a StatefulSet of workers (pod i runs worker i, its own
transactional id), Faust as a Deployment, and `engine.stages: fused`, which runs the fused stage in place
of the online writer and the scorers; bad combinations fail in one line."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.k8s.chart import (
    SPECS,
    acls,
    helm_template,
    of_kind,
    rendered,
    spec,
)

POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


def component_of(doc: dict) -> str:
    return doc["metadata"]["labels"].get("app.kubernetes.io/component", "")


def worker_set(docs: tuple[dict, ...], component: str) -> dict:
    """The StatefulSet of `component`'s workers, checked: pod N runs `<component>-N` (the index from the
    pod-index label), all at once, under a headless governing Service."""
    (workers,) = [d for d in of_kind(docs, "StatefulSet") if component_of(d) == component]
    assert workers["spec"]["podManagementPolicy"] == "Parallel"
    (service,) = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == workers["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == workers["spec"]["selector"]["matchLabels"]
    c = workers["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == [f"{component}-$(EDDY_WORKER_INDEX)"] and "command" not in c
    index = next(e for e in c["env"] if e["name"] == "EDDY_WORKER_INDEX")
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == POD_INDEX
    return workers


def env_of(workers: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in workers["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("spec_name", SPECS)
def test_native_engine_runs_as_workers(spec_name: str) -> None:
    """Native worker N owns the transactional id <app id>-native-N: a StatefulSet never runs two pods with
    one index, where a Deployment's rollout would (the two fencing each other)."""
    docs = rendered(spec_name, "default")
    workers = worker_set(docs, "features-native")
    assert workers["spec"]["replicas"] == 1
    assert not [d for d in of_kind(docs, "Deployment") if component_of(d).startswith("features-")]
    env = env_of(workers)
    assert env["EDDY_STAGES"] == "split" and "EDDY_MODEL_TRUST" not in env
    assert workers["spec"]["template"]["metadata"]["labels"]["eddy.io/role"] == "features"
    # the split stages are all there
    assert {"scorer", "online-writer"} <= {component_of(d) for d in docs if d["kind"] in ("StatefulSet", "Deployment")}


def test_faust_stays_a_deployment() -> None:
    docs = rendered("fraud", "external")
    (faust,) = [d for d in of_kind(docs, "Deployment") if component_of(d) == "features-faust"]
    assert faust["spec"]["replicas"] == 3
    assert faust["spec"]["template"]["spec"]["containers"][0]["args"] == ["features-faust"]


@pytest.mark.parametrize("spec_name", SPECS)
def test_fused_profile_runs_one_stage(spec_name: str) -> None:
    """engine.stages=fused: features-fused-N validates, dedupes, computes features, writes the online
    store and scores, as Kafka and Redis role `fused`; no scorer or online writer, nor anything of theirs."""
    docs = rendered(spec_name, "fused")
    workers = worker_set(docs, "features-fused")
    assert workers["spec"]["replicas"] == 3
    pod = workers["spec"]["template"]
    assert pod["metadata"]["labels"]["eddy.io/role"] == "fused"
    env = env_of(workers)
    assert env["EDDY_STAGES"] == "fused" and env["EDDY_ENGINE"] == "native"
    assert re.fullmatch(r"[0-9a-f]{64}", env["EDDY_MODEL_TRUST"]) and "EDDY_MODEL_KEY" not in env
    assert env["EDDY_REDIS_PASSWORD"]["secretKeyRef"]["key"] == "fused"
    assert env["EDDY_REDIS_URL"].startswith("redis://fused:")
    assert env["EDDY_DEVICE"] == "cpu"
    (init,) = pod["spec"]["initContainers"]  # the client properties of KafkaUser eddy-fused
    assert {"name": "KAFKA_USERNAME", "value": "eddy-fused"} in init["env"]
    c = pod["spec"]["containers"][0]  # the model artifacts, where the scorers find them
    assert c["workingDir"] == "/var/lib/eddy/work"
    assert {"name": "artifacts", "mountPath": "/var/lib/eddy/work"} in c["volumeMounts"]
    gone = {"scorer", "online-writer", "features-native"}
    assert not [d for d in docs if component_of(d) in gone], "split stages rendered with engine.stages=fused"
    assert not of_kind(docs, "ScaledObject") and not of_kind(docs, "TriggerAuthentication")
    assert {d["metadata"]["name"] for d in of_kind(docs, "PodDisruptionBudget")} == {"eddy-features-fused"}
    policies = {p["metadata"]["name"] for p in of_kind(docs, "NetworkPolicy")}
    assert "eddy-fused" in policies and not policies & {"eddy-scorer", "eddy-online-writer", "eddy-features"}
    # the role's KafkaUser and Redis user are the local stack's (deploy.access)
    from deploy.access import kafka_acls, redis_acls

    assert acls(docs)["fused"] == kafka_acls(spec(spec_name))["fused"]
    [redis] = [d for d in of_kind(docs, "StatefulSet") if d["metadata"]["name"].endswith("-redis")]
    script = "\n".join(a for c in redis["spec"]["template"]["spec"]["initContainers"] for a in c.get("args", []))
    (line,) = [x for x in script.splitlines() if x.strip().startswith('echo "user fused ')]
    assert line.rstrip('"').endswith(redis_acls(spec(spec_name))["fused"])


def test_fused_egress_is_kafka_and_redis() -> None:
    policies = {p["metadata"]["name"]: p for p in of_kind(rendered("fraud", "fused"), "NetworkPolicy")}
    fused = policies["eddy-fused"]["spec"]
    assert fused["policyTypes"] == ["Egress"]
    assert fused["podSelector"]["matchLabels"]["eddy.io/role"] == "fused"
    targets = [rule.get("to", [{}])[0] for rule in fused["egress"]]
    assert targets[0] == {}  # DNS
    assert [sorted(t["podSelector"]["matchLabels"]) for t in targets[1:]] == [
        ["strimzi.io/cluster", "strimzi.io/kind"], ["app.kubernetes.io/component", "app.kubernetes.io/instance",
                                                    "app.kubernetes.io/name"]]


@pytest.mark.parametrize(("profile", "sets", "says"), [
    ("default", ["engine.type=faust", "engine.stages=fused"],
     "engine.stages=fused runs on the native engine, not faust: set engine.type=native or engine.stages=split"),
    ("flink", ["engine.stages=fused"], "engine.stages=fused runs on the native engine, not flink"),
    ("default", ["engine.stages=both"], 'engine.stages "both": one of split, fused'),
    ("default", ["engine.replicas=13"], "engine.replicas: more native workers than the source topic's partitions"),
    ("fused", ["engine.replicas=13"], "engine.replicas: more native workers than the source topic's partitions"),
    ("default", ["engine.replicas=17", "kafka.topics.partitions=24"],
     "engine.replicas: at most 16 workers (eddy runs features-native-0 .. features-native-15)"),
    ("fused", ["engine.replicas=17", "kafka.topics.partitions=24"],
     "engine.replicas: at most 16 workers (eddy runs features-fused-0 .. features-fused-15)"),
])
def test_bad_engine_values_fail_in_one_line(profile: str, sets: list[str], says: str) -> None:
    out = helm_template("fraud", profile, *sets)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0], out.stderr
