"""gold/models, the registry table: one row per trained version (and gold/drift beside it). Written with delta-rs,
read with lakehouse.snapshot (no JVM), so `eddy retrain` and `eddy models` need no Spark for it; Spark reads it as gold.models."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from lakehouse.ingest import table_location
from lakehouse.snapshot import read_snapshot
from lakehouse.tables import DRIFT, MODELS, ROLLOUTS, Table

_ARROW = {"timestamp": "timestamp", "boolean": "bool_", "double": "float64", "bigint": "int64", "string": "string"}


def _schema(table: Table):
    import pyarrow as pa

    return pa.schema([(n, pa.timestamp("us", tz="UTC") if t == "timestamp" else getattr(pa, _ARROW[t])())
                      for n, t in table.columns])


def register_model(root: str, entry: dict[str, Any]) -> None:
    """Append one version (the MODELS columns; metrics as a dict) to gold/models."""
    import pyarrow as pa
    from deltalake import write_deltalake

    created = entry["created_at"]
    if isinstance(created, str):
        created = datetime.fromisoformat(created.replace("Z", "+00:00"))
    row = {
        "version": entry["version"], "parent": entry.get("parent"), "kind": entry.get("kind"),
        "spec_hash": entry.get("spec_hash"), "uri": entry.get("uri"), "sha256": entry.get("sha256"),
        "created_at": created.astimezone(UTC),
        "metrics": json.dumps({"holdout": entry.get("metrics"), "champion_holdout": entry.get("champion_metrics")},
                              sort_keys=True),
        "published": bool(entry.get("published")),
    }
    write_deltalake(table_location(root, MODELS), pa.Table.from_pylist([row], schema=_schema(MODELS)), mode="append")


def append_drift(root: str, rows: list[dict[str, Any]]) -> None:
    """Append rows (the DRIFT columns; measured_at a datetime) to gold/drift."""
    import pyarrow as pa
    from deltalake import write_deltalake

    if rows:
        write_deltalake(table_location(root, DRIFT), pa.Table.from_pylist(rows, schema=_schema(DRIFT)), mode="append")


def _rows(root: str, table: Table, order: str) -> list[dict[str, Any]]:
    """Every row of `table`, sorted by `order` ([] before the table exists); a `metrics` column parsed."""
    from deltalake.exceptions import TableNotFoundError

    try:
        rows = read_snapshot(table_location(root, table)).to_pylist()
    except TableNotFoundError:
        return []
    for row in rows:
        if "metrics" in row:
            row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else {}
    return sorted(rows, key=lambda r: r[order])


def drift_history(root: str) -> list[dict[str, Any]]:
    """Every row of gold/drift, oldest first ([] before the first sample)."""
    return _rows(root, DRIFT, "measured_at")


def registered_models(root: str) -> list[dict[str, Any]]:
    """Every row of gold/models, oldest first ([] when no version was registered yet)."""
    return _rows(root, MODELS, "created_at")


def append_rollout(root: str, row: dict[str, Any]) -> None:
    """Append one decision (the ROLLOUTS columns; decided_at a datetime, metrics a dict) to gold/rollouts."""
    import pyarrow as pa
    from deltalake import write_deltalake

    row = {**row, "metrics": json.dumps(row.get("metrics") or {}, sort_keys=True, default=str)}
    write_deltalake(table_location(root, ROLLOUTS), pa.Table.from_pylist([row], schema=_schema(ROLLOUTS)), mode="append")


def rollout_history(root: str, rollout_id: str | None = None) -> list[dict[str, Any]]:
    """The decisions in gold/rollouts (of one rollout, or all), oldest first; metrics parsed."""
    return [r for r in _rows(root, ROLLOUTS, "decided_at") if rollout_id is None or r["rollout_id"] == rollout_id]
