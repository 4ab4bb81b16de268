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


def labelled_predictions(root: str, spec: PipelineSpec):
    """A pandas frame: model_version, score, label (0/1), one row per labelled prediction (the
    first prediction of an event, in Kafka order, if it was ever scored twice)."""
    import pandas as pd
    from deltalake.exceptions import TableNotFoundError

    if spec.labels is None:
        return pd.DataFrame({"model_version": [], "score": [], "label": []})
    tables = {t.topic: t for t in ingested_tables(spec)}
    try:
        predictions = read_snapshot(table_location(root, tables[spec.topics.predictions]),
                                    columns=["event_id", "model_version", "score", "kafka_partition",
                                             "kafka_offset"]).to_pandas()
        labels = read_snapshot(table_location(root, tables[spec.labels.topic]),
                               columns=[spec.labels.id, spec.labels.label, "label_time", "kafka_timestamp"]).to_pandas()
    except TableNotFoundError:
        return pd.DataFrame({"model_version": [], "score": [], "label": []})
    labels = (labels.dropna(subset=[spec.labels.id, spec.labels.label])
              .sort_values(["label_time", "kafka_timestamp"]).drop_duplicates(spec.labels.id, keep="last"))
    predictions = (predictions.dropna(subset=["event_id", "score"])
                   .sort_values(["kafka_partition", "kafka_offset"]).drop_duplicates("event_id", keep="first"))
    joined = predictions.merge(labels, left_on="event_id", right_on=spec.labels.id, how="inner")
    return pd.DataFrame({"model_version": joined["model_version"], "score": joined["score"].astype(np.float64),
                         "label": joined[spec.labels.label].astype(np.int64)})


def live_metrics(root: str, spec: PipelineSpec) -> dict[str, dict[str, Any]]:
    """model_version -> {"labelled", "positives", "pr_auc", "roc_auc", "recall_at_precision_90",
    "precision_at_0.5", "calibration_error"}."""
    frame = labelled_predictions(root, spec)
    out: dict[str, dict[str, Any]] = {}
    for version, group in frame.groupby("model_version"):
        scores, labels = group["score"].to_numpy(), group["label"].to_numpy()
        flagged = scores >= 0.5
        out[str(version)] = {
            "labelled": len(group), "positives": int(labels.sum()), **evaluate(scores, labels),
            "precision_at_0.5": float(labels[flagged].mean()) if flagged.any() else None,
            "calibration_error": calibration_error(scores, labels),
        }
    return out


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
