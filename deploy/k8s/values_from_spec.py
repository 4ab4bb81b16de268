"""The Helm chart's pipeline values, derived from the pipeline spec: the spec file itself, its topics
(as KafkaTopics), consumer groups and the least-privilege Kafka ACL of each role. The chart types
none of these: `python -m deploy.k8s.values_from_spec pipelines/fraud.yaml > values-spec.yaml`."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from deploy.access import GROUP_STAGES, kafka_acls, redis_acls
from features.spec import PipelineSpec, load_spec
from streams.engines.config import STAGE as FEATURES_STAGE
from streams.engines.config import EngineConfig
from streams.engines.native_engine import changelog_topic
from streams.kafka import KafkaConfig

_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")


def resource_name(topic: str) -> str:
    """A Kubernetes object name for a Kafka topic: the topic itself when it is a valid DNS name, else a
    lowercase form with a short hash, so two topics never share a KafkaTopic."""
    if _DNS_NAME.match(topic):
        return topic
    base = re.sub(r"[^-a-z0-9.]+", "-", topic.lower()).strip("-.")[:50] or "topic"
    return f"{base}-{hashlib.sha256(topic.encode()).hexdigest()[:8]}"


def _native_changelog(spec: PipelineSpec) -> str:
    # changelog_topic reads only the config's stage id; the other fields are never looked at
    config = EngineConfig(KafkaConfig("kafka:9092"), spec, redis_url="", data_dir=Path("."), partitions=1)
    return changelog_topic(config)


def chart_values(spec: PipelineSpec, spec_text: str = "", spec_file: str = "") -> dict[str, Any]:
    """The chart's `pipeline` values for `spec`; `spec_text` is the YAML the pods load (EDDY_PIPELINE)."""
    t = spec.topics
    roles = {t.source: "source", t.labels: "labels", t.features: "features", t.predictions: "predictions",
             t.shadow: "shadow", t.dlq: "dlq", t.model_updates: "model-updates"}
    topics = []
    for topic in t.all():
        entry: dict[str, Any] = {"name": topic, "resource": resource_name(topic), "role": roles[topic]}
        if topic == t.model_updates:
            # one partition keeps the updates in order; scorers read the whole history at start
            entry.update(partitions=1, config={"retention.ms": "-1"})
        topics.append(entry)
    native = _native_changelog(spec)
    return {"pipeline": {
        "name": spec.name,
        "specHash": spec.spec_hash,
        "specFile": spec_file or f"{spec.name}.yaml",
        "spec": spec_text,
        "topics": topics,
        # created by the chart only with the native engine; partitioned like the source
        "changelogs": {"native": {"name": native, "resource": resource_name(native), "partitionsOf": t.source,
                                  "config": {"cleanup.policy": "compact"}}},
        "groups": {stage: spec.stage_id(stage) for stage in GROUP_STAGES},
        "transactionalIdPrefixes": {stage: spec.stage_id(stage) for stage in (FEATURES_STAGE, "scorer")},
        "kafkaAcls": kafka_acls(spec),
        # each role's Redis user: its keys by pattern, nothing dangerous, scripts for the engines only
        "redisAcls": {role: rules for role, rules in redis_acls(spec).items() if role != "admin"},
    }}


class _Dumper(yaml.SafeDumper):
    """Block style for the spec text, so values-spec.yaml shows it as written."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m deploy.k8s.values_from_spec SPEC.yaml > values-spec.yaml")
    path = Path(argv[0])
    spec = load_spec(path)
    values = chart_values(spec, path.read_text(encoding="utf-8"), path.name)
    sys.stdout.write(f"# Generated from {path} by deploy/k8s/values_from_spec.py: do not edit, regenerate.\n")
    sys.stdout.write(yaml.dump(values, Dumper=_Dumper, sort_keys=False, width=120))


if __name__ == "__main__":
    main(sys.argv[1:])
