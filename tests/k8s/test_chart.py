"""The Helm chart as rendered by `helm template`: every workload keeps the production rules (non-root,
read-only root, no capabilities, seccomp, requests and limits, probes on /ready and /metrics, a PDB,
network policies, pinned images, secrets only from Secrets), and its topics, consumer groups and ACLs
are what features/spec.py derives for each pipeline. helm comes from deploy/k8s/tools.sh; the chart
checked is EDDY_K8S_CHART (default deploy/helm/eddy), so a broken copy can be checked too."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.access import ROLES, SHARED_GROUP_PREFIXES
from deploy.k8s.values_from_spec import chart_values
from features.spec import parse_spec
from tests.k8s.chart import (
    CHART,
    HELM,
    KUBE_VERSION,
    METRICS_PORT,
    PROFILES,
    REPO,
    SECRET_NAME,
    SPECS,
    acls,
    all_renders,
    is_eddy_stage,
    of_kind,
    rendered,
    spec,
    workloads,
)


@pytest.mark.parametrize(("spec_name", "profile"), all_renders())
def test_every_pod_runs_unprivileged(spec_name: str, profile: str) -> None:
    found = workloads(rendered(spec_name, profile))
    assert found
    for where, _, pod in found:
        ctx = pod.get("securityContext") or {}
        assert ctx.get("runAsNonRoot") is True, f"{where}: pod securityContext lacks runAsNonRoot"
        assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp"
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext") or {}
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}: root filesystem is writable"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: privilege escalation allowed"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}/{c['name']}: capabilities kept"


@pytest.mark.parametrize(("spec_name", "profile"), all_renders())
def test_writable_paths_are_emptydirs(spec_name: str, profile: str) -> None:
    """A read-only root needs EDDY_HOME and /tmp on emptyDirs, in every eddy container."""
    for where, meta, pod in workloads(rendered(spec_name, profile)):
        if not is_eddy_stage(meta):
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            for path in ("/tmp", "/var/lib/eddy/home"):
                assert path in mounts, f"{where}/{c['name']}: {path} is not mounted"
                assert "emptyDir" in volumes[mounts[path]], f"{where}/{c['name']}: {path} is not an emptyDir"
            env = {e["name"]: e for e in c.get("env", [])}
            if "EDDY_HOME" in env:
                assert env["EDDY_HOME"]["value"] == "/var/lib/eddy/home"


@pytest.mark.parametrize(("spec_name", "profile"), all_renders())
def test_resources_requests_and_limits(spec_name: str, profile: str) -> None:
    docs = rendered(spec_name, profile)
    for where, _, pod in workloads(docs):
        if where.startswith(("SparkApplication", "FlinkDeployment")):
            continue  # sized by the operators from cores/memory, checked below
        for c in pod.get("initContainers", []) + pod["containers"]:
            res = c.get("resources", {})
            for side in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(side, {})), f"{where}/{c['name']}: no {side} cpu+memory"
    for app in of_kind(docs, "SparkApplication"):
        for side in ("driver", "executor"):
            assert app["spec"][side]["cores"] and app["spec"][side]["memory"]
    for flink in of_kind(docs, "FlinkDeployment"):
        for side in ("jobManager", "taskManager"):
            assert flink["spec"][side]["resource"]["cpu"] and flink["spec"][side]["resource"]["memory"]


@pytest.mark.parametrize(("spec_name", "profile"), all_renders())
def test_images_are_pinned(spec_name: str, profile: str) -> None:
    docs = rendered(spec_name, profile)
    images = [c["image"] for _, _, pod in workloads(docs) for c in pod.get("initContainers", []) + pod["containers"]
              if "image" in c]  # the operator fills in Flink's main container from spec.image
    images += [d["spec"]["image"] for d in docs if d["kind"] in ("FlinkDeployment", "SparkApplication")]
    assert images
    for image in images:
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag and tag != "latest", f"image {image!r} is not pinned"
        assert "@" not in image or re.search(r"@sha256:[0-9a-f]{64}$", image), image


@pytest.mark.parametrize(("spec_name", "profile"), all_renders())
def test_secrets_come_only_from_secrets(spec_name: str, profile: str) -> None:
    docs = rendered(spec_name, profile)
    assert not of_kind(docs, "Secret"), "the chart must not carry secrets; it references existing Secrets"
    for where, _, pod in workloads(docs):
        for c in pod.get("initContainers", []) + pod["containers"]:
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]):
                    assert "value" not in e, f"{where}/{c['name']}: {e['name']} is a literal"
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}/{c['name']}: {e['name']} not from a Secret"
                if e["name"] == "EDDY_REDIS_URL":  # a URL whose password the kubelet fills from a Secret
                    assert "$(EDDY_REDIS_PASSWORD)" in e["value"], f"{where}: EDDY_REDIS_URL without its Secret"
                    names = [x["name"] for x in c["env"]]
                    assert names.index("EDDY_REDIS_PASSWORD") < names.index("EDDY_REDIS_URL")


@pytest.mark.parametrize(("spec_name", "profile"), all_renders())
def test_only_publishers_hold_the_model_key(spec_name: str, profile: str) -> None:
    """The private model key reaches the retrain jobs (they sign); what scores (the scorers, or the fused
    stage) gets the public keys it trusts."""
    holders, trusting, components = set(), set(), set()
    for where, meta, pod in workloads(rendered(spec_name, profile)):
        component = meta.get("labels", {}).get("app.kubernetes.io/component", where)
        components.add(component)
        for c in pod.get("initContainers", []) + pod["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            if "EDDY_MODEL_KEY" in names:
                holders.add(component)
            if "EDDY_MODEL_TRUST" in names:
                trusting.add(component)
    scoring = components & {"scorer", "features-fused"}
    assert scoring and scoring <= trusting and not scoring & holders, (scoring, trusting)
    assert holders <= {"retrain", "retrainer"} and holders, holders


def serving(docs: tuple[dict, ...]) -> list[tuple[str, dict, dict]]:
    """The long-running eddy stages that serve /metrics and /ready (Deployments and StatefulSets)."""
    return [w for w in workloads(docs) if w[0].split("/")[0] in ("Deployment", "StatefulSet") and is_eddy_stage(w[1])]


@pytest.mark.parametrize(("spec_name", "profile"), all_renders())
def test_probes_mean_something(spec_name: str, profile: str) -> None:
    """Ready only when the stage reaches Kafka (/ready); alive while /metrics answers; on port 9400."""
    stages = serving(rendered(spec_name, profile))
    assert stages
    for where, meta, pod in stages:
        assert meta["labels"].get("eddy.io/metrics") == "true", where
        c = pod["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"metrics": METRICS_PORT}, where
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}, where
        assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}, where
        assert c["startupProbe"]["httpGet"]["port"] == "metrics", where
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["EDDY_METRICS_PORT"] == str(METRICS_PORT), where


@pytest.mark.parametrize(("spec_name", "profile"), all_renders())
def test_every_stage_has_a_disruption_budget(spec_name: str, profile: str) -> None:
    docs = rendered(spec_name, profile)
    budgets = [d["spec"]["selector"]["matchLabels"] for d in of_kind(docs, "PodDisruptionBudget")]
    for where, meta, _ in serving(docs):
        labels = meta["labels"]
        assert any(all(labels.get(k) == v for k, v in sel.items()) for sel in budgets), f"{where}: no PDB"


def selects(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "Exists"
        ok = ok and expr["key"] in labels
    return ok


@pytest.mark.parametrize(("spec_name", "profile"), all_renders())
def test_network_policies_fence_every_stage(spec_name: str, profile: str) -> None:
    docs = rendered(spec_name, profile)
    policies = of_kind(docs, "NetworkPolicy")
    deny = next(p for p in policies if p["metadata"]["name"].endswith("-default-deny"))
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    for where, meta, _ in workloads(docs):
        if not is_eddy_stage(meta):
            continue
        labels = meta["labels"]
        assert selects(deny["spec"]["podSelector"], labels), f"{where}: not under the default deny"
        egress = [p for p in policies if "Egress" in p["spec"]["policyTypes"] and p is not deny
                  and selects(p["spec"]["podSelector"], labels)]
        assert len(egress) == 1, f"{where}: {len(egress)} egress policies"
    metrics = next(p for p in policies if p["metadata"]["name"].endswith("-metrics"))
    (rule,) = metrics["spec"]["ingress"]
    assert rule["ports"] == [{"port": METRICS_PORT, "protocol": "TCP"}]
    assert all("podSelector" in peer for peer in rule["from"]), "metrics must admit Prometheus only"


def test_egress_is_least_privilege() -> None:
    """The scorer and the online writer reach Kafka, Redis and DNS, and nothing else."""
    policies = {p["metadata"]["name"]: p for p in of_kind(rendered("fraud", "default"), "NetworkPolicy")}
    for role in ("scorer", "online-writer"):
        egress = policies[f"eddy-{role}"]["spec"]["egress"]
        targets = [rule.get("to", [{}])[0] for rule in egress]
        assert targets[0] == {}  # DNS: ports only
        assert {tuple(sorted(t["podSelector"]["matchLabels"].items())) for t in targets[1:]} == {
            (("strimzi.io/cluster", "eddy-kafka"), ("strimzi.io/kind", "Kafka")),
            (("app.kubernetes.io/component", "redis"), ("app.kubernetes.io/instance", "eddy"),
             ("app.kubernetes.io/name", "eddy")),
        }


# ---------------------------------------------------------------------------------------------
# Scaling and the GPU profile

@pytest.mark.parametrize("spec_name", SPECS)
def test_scorers_scale_on_their_groups_lag(spec_name: str) -> None:
    docs = rendered(spec_name, "default")
    s = spec(spec_name)
    (scaled,) = of_kind(docs, "ScaledObject")
    (scorers,) = [d for d in of_kind(docs, "StatefulSet") if d["metadata"]["name"].endswith("-scorer")]
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                "name": scorers["metadata"]["name"]}
    assert "replicas" not in scorers["spec"], "KEDA owns the replica count"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == s.stage_id("scorer")
    assert trigger["metadata"]["topic"] == s.topics.features
    assert scaled["spec"]["maxReplicaCount"] <= min(16, topic_names(docs)[s.topics.features]["spec"]["partitions"])
    # replica N runs scorer-N: its transactional id eddy-<pipeline>-scorer-N is never shared
    c = scorers["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["scorer-$(EDDY_SCORER_INDEX)"] and "command" not in c  # the entry point is `eddy run`
    index = next(e for e in c["env"] if e["name"] == "EDDY_SCORER_INDEX")
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"


def test_gpu_profile_puts_scorers_on_gpus() -> None:
    docs = rendered("fraud", "gpu")
    (scorers,) = [d for d in of_kind(docs, "StatefulSet") if d["metadata"]["name"].endswith("-scorer")]
    pod = scorers["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "EDDY_DEVICE", "value": "cuda"} in c["env"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for d in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):  # only scorers take GPUs
        if d is not scorers:
            assert "nvidia.com/gpu" not in str(d["spec"]["template"]["spec"]["containers"][0]["resources"])


def test_flink_profile_runs_the_engine_on_the_operator() -> None:
    docs = rendered("fraud", "flink")
    (flink,) = of_kind(docs, "FlinkDeployment")
    conf = flink["spec"]["flinkConfiguration"]
    assert conf["execution.checkpointing.dir"].startswith("s3://")
    assert flink["spec"]["job"]["args"][:2] == ["-pym", "deploy.flink_main"]
    assert not [d for d in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")
                if d["metadata"]["name"].startswith("eddy-features")]


def test_external_profile_makes_no_kafka_or_redis() -> None:
    docs = rendered("fraud", "external")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"}
    assert not [d for d in of_kind(docs, "StatefulSet") if d["metadata"]["name"].endswith("-redis")]
    for where, meta, pod in workloads(docs):
        if is_eddy_stage(meta) and not where.endswith(":executor"):  # executors get Spark's settings only
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert env["EDDY_KAFKA_BOOTSTRAP"].startswith("broker-1.kafka.example.com:9093")
            assert env["EDDY_REDIS_URL"].startswith("rediss://")
            assert env["EDDY_PARTITIONS"] == "12"  # Faust's changelogs get as many as the topics


# ---------------------------------------------------------------------------------------------
# What the spec derives: topics, groups, ACLs

def topic_names(docs: tuple[dict, ...]) -> dict[str, dict]:
    return {d["spec"].get("topicName", d["metadata"]["name"]): d for d in of_kind(docs, "KafkaTopic")}


def granted(rules: list[dict], kind: str, operation: str) -> set[tuple[str, str]]:
    """(name, patternType) of the resources of `kind` that `rules` allow `operation` on."""
    return {(r["resource"]["name"], r["resource"].get("patternType", "literal")) for r in rules
            if r["resource"]["type"] == kind and (operation in r["operations"] or "All" in r["operations"])}


@pytest.mark.parametrize("spec_name", SPECS)
def test_topics_are_the_specs(spec_name: str) -> None:
    s = spec(spec_name)
    topics = topic_names(rendered(spec_name, "default"))
    changelogs = set(topics) - set(s.topics.all())
    assert set(s.topics.all()) <= set(topics)
    (changelog,) = changelogs  # the native engine's state changelog, named after the features stage
    assert changelog.startswith(s.stage_id("features") + "-")
    assert topics[changelog]["spec"]["config"]["cleanup.policy"] == "compact"
    assert topics[changelog]["spec"]["partitions"] == topics[s.topics.source]["spec"]["partitions"]
    assert topics[s.topics.model_updates]["spec"]["partitions"] == 1
    assert all(t["spec"]["config"]["min.insync.replicas"] == 2 for t in topics.values())
    # other engines keep their own internal topics: no native changelog then
    assert set(topic_names(rendered(spec_name, "flink"))) == set(s.topics.all())


@pytest.mark.parametrize("spec_name", SPECS)
def test_acls_are_least_privilege_for_the_spec(spec_name: str) -> None:
    s, t = spec(spec_name), spec(spec_name).topics
    rules = acls(rendered(spec_name, "default"))
    assert set(rules) == set(ROLES)
    inputs = {t.source} | ({t.labels} if t.labels else set())

    def topics(role: str, op: str) -> set[str]:
        return {name for name, pattern in granted(rules[role], "topic", op) if pattern == "literal"}

    assert topics("producer", "Write") == inputs
    assert topics("features", "Read") == {t.source, t.features, t.dlq}  # Flink's sink describes its producers
    assert topics("features", "Write") == {t.features, t.dlq}
    assert topics("scorer", "Read") == {t.features, t.model_updates}
    assert topics("scorer", "Write") == {t.predictions, t.shadow, t.dlq}  # the shadow topic: rollouts
    assert topics("online-writer", "Read") == {t.features} and not topics("online-writer", "Write")
    assert topics("lakehouse", "Read") == set(t.all()) and not topics("lakehouse", "Write")
    # the retrainer is the only writer of model-updates
    writers = {role for role in ROLES if role != "admin" and t.model_updates in topics(role, "Write")}
    assert writers == {"publisher"}
    assert not topics("reader", "Write")
    # groups and transactional ids are the stages' ids
    assert (s.stage_id("scorer"), "literal") in granted(rules["scorer"], "group", "Read")
    assert (s.stage_id("online-writer"), "literal") in granted(rules["online-writer"], "group", "Read")
    assert (s.stage_id("features"), "prefix") in granted(rules["features"], "group", "Read")
    assert (s.stage_id("lakehouse"), "prefix") in granted(rules["lakehouse"], "group", "Read")
    assert granted(rules["features"], "transactionalId", "Write") == {(s.stage_id("features"), "prefix")}
    assert granted(rules["scorer"], "transactionalId", "Write") == {(s.stage_id("scorer"), "prefix")}
    # prefixes never reach past this pipeline's own names (Spark's and `eddy consume`'s group prefixes aside)
    for role in ROLES:
        if role == "admin":
            continue
        for r in rules[role]:
            res = r["resource"]
            assert "All" not in r["operations"], f"{role}: All"
            assert res["type"] in ("topic", "group", "transactionalId"), f"{role}: {res}"
            if res["type"] == "topic" and res.get("patternType") == "prefix":
                assert res["name"] == s.stage_id("features"), f"{role}: topic prefix {res['name']}"
            if res["type"] in ("group", "transactionalId") and res["name"] not in SHARED_GROUP_PREFIXES:
                assert res["name"].startswith(f"eddy-{s.name}-"), f"{role}: {res}"


@pytest.mark.parametrize("spec_name", SPECS)
def test_stages_load_the_spec_they_were_rendered_from(spec_name: str) -> None:
    docs = rendered(spec_name, "default")
    s = spec(spec_name)
    (config,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "eddy-spec"]
    (name, text), = config["data"].items()
    assert parse_spec(yaml.safe_load(text)).spec_hash == s.spec_hash
    for where, meta, pod in workloads(docs):
        if not is_eddy_stage(meta) or where.endswith(":executor"):
            continue
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env.get("EDDY_PIPELINE") == f"/etc/eddy/pipeline/{name}", where
        assert meta.get("annotations", {}).get("eddy.io/spec-hash", s.spec_hash) == s.spec_hash, where


def test_chart_refuses_latest_and_missing_spec_values() -> None:
    base = [str(HELM), "template", "eddy", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(REPO / "deploy/helm/eddy/ci/default-values.yaml")]
    missing = subprocess.run(base, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode != 0 and "values_from_spec" in missing.stderr
    values = yaml.safe_dump(chart_values(spec("fraud"), "name: fraud\n", "fraud.yaml"))
    latest = subprocess.run([*base, "-f", "-", "--set", "image.tag=latest"], input=values,
                            capture_output=True, text=True, timeout=60, check=False)
    assert latest.returncode != 0 and '"latest" is refused' in latest.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_stages_run_eddys_own_components(profile: str) -> None:
    """The image's entry point is `eddy run`: each stage's args name a component `eddy run` knows (pod 0
    of a StatefulSet's workers runs `<stage>-0`, which `eddy run` takes for the stage), running as the
    Kafka and Redis role the pod is given; the jobs call `eddy` commands."""
    from deploy.components import COMPONENTS, component_named

    for where, meta, pod in workloads(rendered("fraud", profile)):
        if not is_eddy_stage(meta) or where.startswith(("SparkApplication", "FlinkDeployment")):
            continue
        c = pod["containers"][0]
        if where.startswith("CronJob"):
            assert c["command"] == ["eddy"] and c["args"][0] in ("retrain", "lakehouse"), where
        else:
            (stage,) = c["args"]
            name = component_named(re.sub(r"\$\(EDDY_(SCORER|WORKER)_INDEX\)", "0", stage))
            assert name in COMPONENTS, where
            assert COMPONENTS[name].role == meta["labels"]["eddy.io/role"], where


def test_chart_renders_without_the_monitoring_files(tmp_path: Path) -> None:
    """files/monitoring links to deploy/monitoring; without rules or dashboards there is no rule object."""
    import shutil

    chart = tmp_path / "eddy"
    shutil.copytree(CHART, chart, symlinks=True)
    (chart / "files" / "monitoring").unlink()
    (chart / "files" / "monitoring").mkdir()
    values = yaml.safe_dump(chart_values(spec("fraud"), "name: fraud\n", "fraud.yaml"))
    out = subprocess.run([str(HELM), "template", "eddy", str(chart), "--kube-version", KUBE_VERSION, "-f", "-",
                          "-f", str(REPO / "deploy/helm/eddy/ci/default-values.yaml")],
                         input=values, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert "PrometheusRule" not in kinds and kinds.count("ConfigMap") == 1
    assert (CHART / "files" / "monitoring" / "rules").is_dir() or "PrometheusRule" not in {
        d["kind"] for d in rendered("fraud", "default")}


@pytest.mark.parametrize("spec_name", SPECS)
def test_redis_users_are_the_spec_roles_least_privilege(spec_name: str) -> None:
    """The chart's Redis users are the local stack's (deploy.access): keys by pattern, nothing dangerous."""
    from deploy.access import redis_acls

    [redis] = [d for d in of_kind(rendered(spec_name, "default"), "StatefulSet")
               if d["metadata"]["name"].endswith("-redis")]
    pod = redis["spec"]["template"]["spec"]
    [script] = [arg for c in pod.get("initContainers", []) + pod["containers"] for arg in c.get("args", [])
                if "user default off" in arg]
    users = {line.split()[2]: line for line in script.splitlines() if line.strip().startswith('echo "user ')}
    assert 'echo "user default off"' in script
    assert set(users) == {*ROLES, "default"}
    for role, rules in redis_acls(spec(spec_name)).items():
        if role != "admin":
            assert users[role].rstrip('"').endswith(rules), role
    assert users["admin"].rstrip('"').endswith("~* &* +@all")
    assert f"%R~*{spec(spec_name).name}" in users["scorer"] and "+@scripting" not in users["scorer"]
