"""Live quality of each serving version: its predictions in gold/predictions joined with the labels
in bronze/labels (the newest label per event), scored with the same evaluate() as the holdout.
Read with delta-rs, so any Delta reader recomputing it from the tables gets the same numbers."""

from __future__ import annotations

from typing import Any

import numpy as np

from features.spec import PipelineSpec
from lakehouse.ingest import table_location
from lakehouse.snapshot import read_snapshot
from lakehouse.tables import ingested_tables
from models.training import evaluate


def labelled_predictions(root: str, spec: PipelineSpec, served: bool = True):
    """A pandas frame: event_id, model_version, role, score, label (0/1), kafka_timestamp, one row per labelled
    prediction: with `served`, the first served prediction of each event (in Kafka order, if it was ever
    scored twice); otherwise also the first shadow prediction of each event."""
    import pandas as pd
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    empty = pd.DataFrame({"event_id": [], "model_version": [], "role": [], "score": [], "label": [],
                          "kafka_timestamp": []})
    if spec.labels is None:
        return empty
    tables = {t.topic: t for t in ingested_tables(spec)}
    try:
        location = table_location(root, tables[spec.topics.predictions])
        has_role = "role" in {f.name for f in DeltaTable(location).schema().fields}  # none before rollouts
        predictions = read_snapshot(location, columns=["event_id", "model_version", "score", "kafka_partition",
                                                       "kafka_offset", "kafka_timestamp",
                                                       *(["role"] if has_role else [])]).to_pandas()
        labels = read_snapshot(table_location(root, tables[spec.labels.topic]),
                               columns=[spec.labels.id, spec.labels.label, "label_time", "kafka_timestamp"]).to_pandas()
    except TableNotFoundError:
        return empty
    if "role" not in predictions:
        predictions["role"] = "champion"
    predictions["role"] = predictions["role"].fillna("champion")
    labels = (labels.dropna(subset=[spec.labels.id, spec.labels.label])
              .sort_values(["label_time", "kafka_timestamp"]).drop_duplicates(spec.labels.id, keep="last")
              .drop(columns=["kafka_timestamp"]))
    predictions = predictions.dropna(subset=["event_id", "score"]).sort_values(["kafka_partition", "kafka_offset"])
    shadow = predictions["role"] == "shadow"
    parts = [predictions[~shadow].drop_duplicates("event_id", keep="first")]
    if not served:
        parts.append(predictions[shadow].drop_duplicates("event_id", keep="first"))
    joined = pd.concat(parts).merge(labels, left_on="event_id", right_on=spec.labels.id, how="inner")
    return pd.DataFrame({"event_id": joined["event_id"], "model_version": joined["model_version"],
                         "role": joined["role"],
                         "score": joined["score"].astype(np.float64),
                         "label": joined[spec.labels.label].astype(np.int64),
                         "kafka_timestamp": joined["kafka_timestamp"]})


def quality(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The live figures of labelled predictions: evaluate()'s, with counts, precision at the serving
    threshold and calibration error."""
    flagged = scores >= 0.5
    return {"labelled": len(scores), "positives": int(labels.sum()), **evaluate(scores, labels),
            "precision_at_0.5": float(labels[flagged].mean()) if flagged.any() else None,
            "calibration_error": calibration_error(scores, labels)}


def rollout_figures(root: str, spec: PipelineSpec, champion: str, challenger: str,
                    since_s: float) -> dict[str, dict[str, Any]]:
    """{"champion": ..., "challenger": ...}: quality() of each version's labelled predictions of the same
    events, those both versions scored (one served it, the other scored it in shadow) whose Kafka
    timestamp is at or after `since_s` (epoch seconds: the step began), with `precision` and `scores`
    (their scores) for models.rollout.judge(). Paired on events, the two are never judged on different
    entities: at 50%, each half of the cards has its own fraud, and halves differ by more than any bound."""
    import pandas as pd

    frame = labelled_predictions(root, spec, served=False)
    if len(frame):
        frame = frame[pd.to_datetime(frame["kafka_timestamp"], utc=True) >= pd.Timestamp(since_s, unit="s", tz="UTC")]
    sides = {who: frame[(frame["model_version"] == version) & frame["role"].isin(roles)].drop_duplicates("event_id")
             for who, version, roles in (("champion", champion, ("champion", "shadow")),
                                         ("challenger", challenger, ("canary", "shadow")))}
    both = set(sides["champion"]["event_id"]) & set(sides["challenger"]["event_id"])
    out = {}
    for who, rows in sides.items():
        rows = rows[rows["event_id"].isin(both)]
        scores, labels = rows["score"].to_numpy(), rows["label"].to_numpy()
        figures = quality(scores, labels) if len(rows) else {"labelled": 0, "positives": 0}
        out[who] = {**figures, "precision": figures.get("precision_at_0.5"), "scores": scores}
    return out


def live_metrics(root: str, spec: PipelineSpec) -> dict[str, dict[str, Any]]:
    """model_version -> {"labelled", "positives", "pr_auc", "roc_auc", "recall_at_precision_90",
    "precision_at_0.5", "calibration_error"}, on the predictions each version served."""
    frame = labelled_predictions(root, spec)
    return {str(version): quality(group["score"].to_numpy(), group["label"].to_numpy())
            for version, group in frame.groupby("model_version")}


def calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float | None:
    """Expected calibration error: over `bins` equal-width score bins, the row-weighted mean of
    |mean score - positive rate| (None without rows)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if not scores.size:
        return None
    which = np.minimum((np.clip(scores, 0.0, 1.0) * bins).astype(np.int64), bins - 1)
    rows = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, scores, bins) - np.bincount(which, labels, bins))
    return float(gap.sum() / rows.sum())
