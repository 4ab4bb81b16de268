"""The model registry as the stack sees it today: signed artifacts under the lakehouse root, and the
model-updates topic saying which version serves. `eddy models`, `eddy promote`, `eddy rollback`."""

from __future__ import annotations

import json
from typing import Any

from features.errors import EddyError
from features.spec import PipelineSpec
from models.artifacts import verify_artifact
from models.policy import check_publish
from models.signing import SigningKey, TrustedKeys
from models.store import Artifacts
from models.updates import publish, read_updates, serves, serving_update, supersedes
from streams.kafka import KafkaConfig


def list_models(kafka: KafkaConfig, spec: PipelineSpec, artifacts: Artifacts, key: TrustedKeys,
                lakehouse_root: str | None = None) -> list[dict[str, Any]]:
    """Every artifact of this pipeline with its manifest's metrics, newest first; `serving` marks the
    one in use; with the lakehouse root, `live` holds each version's quality on live labelled
    predictions and `registered` says whether gold/models lists it."""
    serving = serving_update(read_updates(kafka, spec, key, artifacts.store))
    artifacts.sync(spec.name)
    live: dict[str, Any] = {}
    registered: set[str] = set()
    if lakehouse_root is not None:
        from lakehouse.registry import registered_models
        from models.live import live_metrics

        live = live_metrics(lakehouse_root, spec)
        registered = {row["version"] for row in registered_models(lakehouse_root)}
    out = []
    for manifest_file in sorted((artifacts.local / spec.name).glob("*/manifest.json")):
        data = json.loads(manifest_file.read_text())
        out.append({"version": data.get("version"), "created_at": data.get("created_at"), "kind": data.get("kind"),
                    "parent": data.get("parent"), "metrics": data.get("metrics", {}),
                    "serving": serving is not None and serving["version"] == data.get("version"),
                    "uri": artifacts.uri(manifest_file.parent),
                    "live": live.get(data.get("version")), "registered": data.get("version") in registered})
    return sorted(out, key=lambda m: str(m["created_at"]), reverse=True)


def promote(kafka: KafkaConfig, spec: PipelineSpec, artifacts: Artifacts, key: SigningKey, version: str,
            action: str = "promote") -> None:
    """Publish an existing version so that scorers serve it, whatever its age."""
    directory = artifacts.existing(spec.name, version)
    manifest = verify_artifact(directory, key, spec.spec_hash, list(spec.model_inputs))
    check_publish(spec, manifest, key, action)
    publish(kafka, spec.topics.model_updates, manifest, artifacts.publish(directory), key, action=action)


def rollback(kafka: KafkaConfig, spec: PipelineSpec, artifacts: Artifacts, key: SigningKey) -> str:
    """Serve again the version that served before the current one; returns it."""
    served: list[str] = []
    current = None
    for message in read_updates(kafka, spec, key, artifacts.store):
        if serves(message) and supersedes(message, current):
            current = message
            if not served or served[-1] != message["version"]:
                served.append(message["version"])
    if len(served) < 2:
        raise EddyError("nothing to roll back to: only one version has served")
    previous = served[-2]
    promote(kafka, spec, artifacts, key, previous, action="rollback")
    return previous
