"""`eddy retrain`: a training set of labelled feature rows, a time-ordered split, training, evaluation
against the serving champion on the same holdout, a signed artifact, and publication when better.

The rows come from the features and labels topics (each features record joined with its label by
event id); reading them from the lakehouse's silver/features and bronze/labels is the same join."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from features.errors import EddyError
from features.spec import PipelineSpec
from models.artifacts import load_artifact, save_artifact
from models.drift import reference
from models.groups import RETRAIN_GROUP_PREFIX
from models.inputs import rows_to_array, spec_log_mask
from models.policy import PublishRefused, check_publish
from models.rollout import Policy, Route, current_rollout, publish_step, start_route
from models.scoring import LoadedModel, pick_device
from models.signing import SigningKey
from models.store import Artifacts, fetched
from models.training import evaluate, train
from models.updates import publish, read_updates, serving_update
from streams.kafka import KafkaConfig, json_object, read_topic

PUBLISH_MODES = ("auto", "always", "never")

log = logging.getLogger(__name__)


@dataclass
class RetrainResult:
    """One retrain's outcome: the new version, its holdout metrics beside the champion's on the same
    holdout, whether it was published, the training set's size and where the artifact is."""

    version: str
    champion: str | None
    metrics: dict[str, Any]
    champion_metrics: dict[str, Any] | None
    published: bool
    rows: int
    positives: int
    seconds: float
    uri: str
    rollout: Route | None = None  # the rollout started instead of publishing (a rollout policy was given)
    refused: str | None = None  # why the spec's publish policy kept it from the topic
    unjoined_labels: int = 0  # labels whose event had no features row to join


def _read_all(kafka: KafkaConfig, topic: str) -> list[bytes]:
    """Every record value of `topic` (tombstones have none)."""
    return [v for m in read_topic(kafka, topic, group_prefix=RETRAIN_GROUP_PREFIX) if (v := m.value()) is not None]


class TrainingSet(NamedTuple):
    """Labelled feature records oldest first, their 0/1 labels, and how many labels joined no features
    record (their event's record not there yet, or no event with that id): counted, never silently lost."""

    records: list[dict]
    labels: np.ndarray
    unjoined_labels: int = 0


def training_set(kafka: KafkaConfig, spec: PipelineSpec) -> TrainingSet:
    """Feature records with a label, in event-time order, and their 0/1 labels. A record of either
    topic that is not a label or a features record (poison) is skipped and counted in the log."""
    if spec.labels is None:
        raise EddyError(f"spec {spec.name!r} has no labels section: nothing to train on")
    lid, name = spec.labels.id, spec.labels.label
    labels: dict[str, bool] = {}
    skipped = 0
    for label in map(json_object, _read_all(kafka, spec.labels.topic)):
        if label.get(lid) is None or not isinstance(label.get(name), bool | int):
            skipped += 1
            continue
        labels[str(label[lid])] = bool(label[name])
    records = []
    for record in map(json_object, _read_all(kafka, spec.topics.features)):
        if record.get("event_id") in labels and isinstance(record.get("event_time"), str):
            records.append(record)
        elif not record:
            skipped += 1
    if skipped:
        log.warning("skipped %d records of %s and %s that are not labels or features records", skipped,
                    spec.labels.topic, spec.topics.features)
    records.sort(key=lambda r: r["event_time"])
    joined = {r["event_id"] for r in records}
    return TrainingSet(records, np.array([labels[r["event_id"]] for r in records], dtype=np.float64),
                       sum(1 for event_id in labels if event_id not in joined))


def records_from_frame(spec: PipelineSpec, frame, unjoined_labels: int = 0) -> TrainingSet:
    """Rows of lakehouse.training.labelled_features as feature records (the features topic's shape,
    null features as None) and their labels."""
    import math

    names = list(spec.feature_names)
    records = []
    for row in frame.itertuples(index=False):
        values = row._asdict()
        features = {n: (None if isinstance(v := values[n], float) and math.isnan(v) else v) for n in names}
        records.append({"event_id": values["event_id"], spec.key: values[spec.key],
                        "event_time": values["event_time"].isoformat(), "features": features,
                        "late": bool(values["late"])})
    return TrainingSet(records, frame["label"].to_numpy(dtype=np.float64), unjoined_labels)


def _inputs(spec: PipelineSpec, records: list[dict], seq_len: int) -> list:
    """mlp: the feature dicts; sequence: each record's entity history (oldest first, itself last)."""
    if spec.model.kind != "sequence":
        return [r["features"] for r in records]
    seen: dict[str, list[dict]] = defaultdict(list)
    out = []
    for r in records:
        history = seen[r[spec.key]]
        out.append([*history[-(seq_len - 1):], r["features"]])
        if not r.get("late"):
            history.append(r["features"])
    return out


def _score(model: LoadedModel, spec: PipelineSpec, inputs: list) -> np.ndarray:
    return model.score_sequences(inputs) if spec.model.kind == "sequence" else model.score(inputs)


def drift_reference(spec: PipelineSpec, records: list[dict], scores: np.ndarray) -> dict[str, Any]:
    """The distribution drift is measured against (models.drift): the holdout's features and scores,
    the newest labelled rows, in which every window has filled as it has on the live stream."""
    names = list(spec.model_inputs)
    return reference(rows_to_array([r["features"] for r in records], names), names, scores)


def retrain(kafka: KafkaConfig, spec: PipelineSpec, artifacts: Artifacts, key: SigningKey, device: str,
            publish_mode: str = "auto", epochs: int = 8, seed: int = 0,
            on_progress: Callable[[str], None] = lambda line: None,
            rows: Callable[[], TrainingSet] | None = None,
            register: Callable[[dict[str, Any]], None] | None = None,
            rollout_policy: Policy | None = None) -> RetrainResult:
    """rows() gives the labelled feature records oldest first (default: read from the topics);
    register(entry) records the new version in the registry table (gold/models). With a rollout
    policy, a better version under `--publish auto` starts a rollout against the champion instead of
    replacing it at once (unless a rollout is already in progress: then it is only registered)."""
    if publish_mode not in PUBLISH_MODES:
        raise EddyError(f"--publish {publish_mode!r} is not one of {', '.join(PUBLISH_MODES)}")
    started = time.perf_counter()
    on_progress("reading labelled feature rows")
    records, y, unjoined = rows() if rows is not None else training_set(kafka, spec)
    if unjoined:
        log.info("%d labels joined no features row yet (kept: a later retrain joins them)", unjoined)
    if len(records) < 200 or y.sum() < 5 or y.sum() == len(y):
        raise EddyError(f"only {len(records)} labelled rows ({int(y.sum())} positive): produce events with labels "
                        "first (eddy produce --backfill 24h) and let the stack process them")
    split = int(len(records) * 0.8)  # time-ordered: the newest 20% is the holdout
    dev = pick_device(device)
    updates = read_updates(kafka, spec, key, artifacts.store)
    current = serving_update(updates)
    champion = None
    if current is not None:
        with fetched(current["uri"], artifacts.store) as directory:
            champion = load_artifact(directory, key, spec.spec_hash, list(spec.model_inputs), dev)
    seq_len = champion.seq_len if champion is not None and champion.seq_len else 8
    inputs = _inputs(spec, records, seq_len)

    def progress(epoch: int, total: int, loss: float) -> None:
        on_progress(f"epoch {epoch}/{total} loss {loss:.4f}")

    on_progress(f"training {spec.model.kind} on {split:,} rows ({int(y[:split].sum())} positive)")
    model, normaliser = train(spec.model.kind, inputs[:split], y[:split], seed=seed, device=dev, epochs=epochs,
                              on_progress=progress, names=spec.model_inputs, log1p=spec_log_mask(spec.features))
    new = LoadedModel(model, normaliser, device=dev)
    holdout_scores = _score(new, spec, inputs[split:])
    metrics = {**evaluate(holdout_scores, y[split:]), "holdout_rows": len(records) - split, "train_rows": split}
    champion_metrics = None
    if champion is not None:
        champion_metrics = evaluate(_score(champion, spec, inputs[split:]), y[split:])
    version = "v" + datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    directory = artifacts.directory(spec.name, version)
    manifest = save_artifact(directory, model, normaliser,
                             {"version": version, "spec_hash": spec.spec_hash, "metrics": metrics,
                              "parent": current["version"] if current else None, "name": spec.model.name,
                              "reference": drift_reference(spec, records[split:], holdout_scores)}, key)
    better = champion_metrics is None or (metrics["pr_auc"] or 0) > (champion_metrics["pr_auc"] or 0)
    published = publish_mode == "always" or (publish_mode == "auto" and better)
    uri = artifacts.publish(directory)  # uploaded even when not served, so any host can promote it later
    route, refused = None, None
    if published:
        try:
            check_publish(spec, manifest, key, "publish", champion_metrics)
        except PublishRefused as exc:
            published, refused = False, str(exc)
            on_progress(f"not published: {refused}")
    if published and publish_mode == "auto" and rollout_policy is not None and current is not None:
        published = False
        if current_rollout(updates) is None:
            route = start_route(current["version"], version, rollout_policy)
            publish_step(kafka, spec, key, {"uri": uri}, route, artifacts.store)
    elif published:
        publish(kafka, spec.topics.model_updates, manifest, uri, key)
    if register is not None:
        register({"version": version, "parent": current["version"] if current else None, "kind": spec.model.kind,
                  "spec_hash": spec.spec_hash, "uri": uri, "sha256": manifest.sha256,
                  "created_at": manifest.created_at, "metrics": metrics, "champion_metrics": champion_metrics,
                  "published": published})
    return RetrainResult(version, current["version"] if current else None, metrics, champion_metrics, published,
                         len(records), int(y.sum()), round(time.perf_counter() - started, 2), uri, route, refused,
                         unjoined)
