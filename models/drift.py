"""Feature drift in the stream: a model's reference distribution of each input feature and of its
score (fixed quantile bins, recorded in the manifest at training), the live distribution over a
sliding window of the rows a scorer serves, and the population stability index between them.

PSI = sum over bins of (live - ref) * ln(live / ref), shares clipped at 1e-4 so that an empty bin
counts as rare rather than infinite. Nulls are kept out of the bins and reported as a share of
their own, so a producer that stops sending a field shows as nulls, not as a shift. Usual reading:
below 0.1 stable, 0.1-0.2 a moderate shift, above 0.2 (DRIFT_BOUND) a shift worth acting on.

A scorer replica keeps its window's bin counts (DriftWindow) and writes them to Redis; every reader
(`eddy drift`, the lakehouse's gold.drift, continuous retraining) merges the replicas' counts for
the serving version (merged_snapshot), so the numbers are those of all the rows every replica saw."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

BINS = 10
DRIFT_BOUND = 0.2
WINDOW_ROWS = 10_000
_FLOOR = 1e-4
_TTL_S = 3600  # a replica's counts are kept this long after its last write


def drift_key(pipeline: str) -> str:
    """The Redis hash of the replicas' windows: field = replica, value = its snapshot (JSON)."""
    return f"eddy:{pipeline}:drift"


# -- the reference, at training -------------------------------------------------------------------------

def _bins_of(values: np.ndarray, bins: int) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    nulls = float(1.0 - finite.size / values.size) if values.size else 0.0
    if not finite.size:
        return {"edges": [], "shares": [1.0], "null_share": nulls}
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
    return {"edges": edges.tolist(), "shares": (counts / finite.size).tolist(), "null_share": nulls}


def reference(values: np.ndarray, names: Sequence[str], scores: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    """The manifest's `reference`: for each feature (columns of raw values [N, F], NaN = null) and
    for the score, the inner quantile edges of `bins` bins (fewer when values repeat), each bin's
    share of the non-null rows (a value equal to an edge falls in the bin above it), and the null share."""
    values = np.asarray(values, dtype=np.float64)
    return {"bins": bins, "rows": int(values.shape[0]),
            "features": {name: _bins_of(values[:, i], bins) for i, name in enumerate(names)},
            "score": _bins_of(np.asarray(scores, dtype=np.float64), bins)}


def psi(expected: Sequence[float], counts: Sequence[int] | np.ndarray) -> float | None:
    """PSI of live bin counts against reference shares (None without live rows)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return None
    live = np.clip(counts / total, _FLOOR, None)
    ref = np.clip(np.asarray(expected, dtype=np.float64), _FLOOR, None)
    return float(np.sum((live - ref) * np.log(live / ref)))


# -- the live window, in a scorer --------------------------------------------------------------------------

class DriftWindow:
    """The bin of each of the last `size` rows' features and scores in a ring, with running counts:
    add() costs one searchsorted per feature per batch and two bincounts, never a pass over the window."""

    def __init__(self, ref: Mapping[str, Any], names: Sequence[str], version: str, size: int = WINDOW_ROWS) -> None:
        self.version, self.size, self.names = version, size, tuple(names)
        self.ref = ref
        self._edges = [np.asarray(ref["features"][n]["edges"], dtype=np.float64) for n in self.names]
        self._score_edges = np.asarray(ref["score"]["edges"], dtype=np.float64)
        # Column j of the ring: feature j's bin (-1: null); the last column: the score's bin.
        widths = [e.size + 1 for e in self._edges] + [self._score_edges.size + 1]
        self._offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
        self._counts = np.zeros(int(sum(widths)) + 1, dtype=np.int64)  # + 1: the nulls' slot, dropped
        self._null = self._counts.size - 1
        self._ring = np.full((size, len(self.names) + 1), self._null, dtype=np.int64)
        self._filled = 0
        self._at = 0
        self._nulls = np.zeros(len(self.names), dtype=np.int64)
        self._lock = threading.Lock()

    def add(self, values: np.ndarray, scores: np.ndarray) -> None:
        """One batch: raw feature values [B, F] (NaN = null) in `names` order and its scores [B]."""
        values = np.asarray(values, dtype=np.float64)[-self.size:]
        scores = np.asarray(scores, dtype=np.float64)[-self.size:]
        n = values.shape[0]
        if not n:
            return
        slots = np.empty((n, len(self.names) + 1), dtype=np.int64)
        for j, edges in enumerate(self._edges):
            column = values[:, j]
            finite = np.isfinite(column)
            slots[:, j] = np.where(finite, self._offsets[j] + np.searchsorted(edges, column, side="right"), self._null)
        slots[:, -1] = np.where(np.isfinite(scores), self._offsets[-1] + np.searchsorted(
            self._score_edges, scores, side="right"), self._null)
        rows = (self._at + np.arange(n)) % self.size
        with self._lock:
            old = self._ring[rows]
            live = rows < self._filled if self._filled < self.size else np.ones(n, dtype=bool)
            self._counts -= np.bincount(old[live].ravel(), minlength=self._counts.size)
            self._nulls -= (old[live, :-1] == self._null).sum(axis=0)
            self._ring[rows] = slots
            self._counts += np.bincount(slots.ravel(), minlength=self._counts.size)
            self._nulls += (slots[:, :-1] == self._null).sum(axis=0)
            self._at = int((self._at + n) % self.size)
            self._filled = min(self.size, self._filled + n)

    def snapshot(self) -> dict[str, Any]:
        """The window as counts per bin (mergeable across replicas) with the reference shares they
        are judged against: {"version", "rows", "at", "features": {name: {"counts", "nulls",
        "expected", "ref_null_share"}}, "score": {"counts", "expected"}}."""
        with self._lock:
            counts, nulls, rows = self._counts.copy(), self._nulls.copy(), self._filled
        features = {}
        for j, name in enumerate(self.names):
            start = self._offsets[j]
            features[name] = {"counts": counts[start:start + self._edges[j].size + 1].tolist(),
                              "nulls": int(nulls[j]), "expected": self.ref["features"][name]["shares"],
                              "ref_null_share": self.ref["features"][name]["null_share"]}
        start = self._offsets[-1]
        return {"version": self.version, "rows": rows, "at": time.time(), "features": features,
                "score": {"counts": counts[start:start + self._score_edges.size + 1].tolist(),
                          "expected": self.ref["score"]["shares"]}}


def measures(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot's figures: {"version", "rows", "score_psi", "features": {name: {"psi",
    "null_share", "ref_null_share"}}} (psi None while the window is empty)."""
    rows = int(snapshot["rows"])
    features = {name: {"psi": psi(f["expected"], f["counts"]),
                       "null_share": (f["nulls"] / rows) if rows else None,
                       "ref_null_share": f["ref_null_share"]}
                for name, f in snapshot["features"].items()}
    return {"version": snapshot["version"], "rows": rows, "at": snapshot.get("at"),
            "score_psi": psi(snapshot["score"]["expected"], snapshot["score"]["counts"]), "features": features}


# -- in Redis, across replicas ----------------------------------------------------------------------------

def publish_snapshot(client, pipeline: str, replica: int, snapshot: Mapping[str, Any]) -> None:
    key = drift_key(pipeline)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, str(replica), orjson.dumps(snapshot))
    pipe.expire(key, _TTL_S)
    pipe.execute()


def merged_snapshot(client, pipeline: str, version: str | None = None,
                    max_age_s: float = 300.0) -> dict[str, Any] | None:
    """The replicas' windows summed, for `version` (default: the version most replicas report);
    windows older than max_age_s (a replica gone) are left out. None when no replica reports one."""
    now = time.time()
    snapshots = [orjson.loads(v) for v in (client.hgetall(drift_key(pipeline)) or {}).values()]
    snapshots = [s for s in snapshots if now - float(s.get("at") or 0) <= max_age_s]
    if version is None and snapshots:
        versions = [s["version"] for s in snapshots]
        version = max(set(versions), key=versions.count)
    chosen = [s for s in snapshots if s["version"] == version]
    if not chosen:
        return None
    merged = orjson.loads(orjson.dumps(chosen[0]))
    for other in chosen[1:]:
        merged["rows"] += other["rows"]
        merged["at"] = max(merged["at"], other["at"])
        for name, f in merged["features"].items():
            o = other["features"][name]
            f["counts"] = [a + b for a, b in zip(f["counts"], o["counts"], strict=True)]
            f["nulls"] += o["nulls"]
        merged["score"]["counts"] = [a + b for a, b in zip(merged["score"]["counts"], other["score"]["counts"],
                                                            strict=True)]
    merged["replicas"] = len(chosen)
    return merged


def largest_drift(client, pipeline: str) -> float | None:
    """The largest feature PSI of the serving version's merged window (None: none measured, or
    Redis did not answer: a trigger that cannot be read does not fire)."""
    from redis.exceptions import RedisError

    try:
        merged = merged_snapshot(client, pipeline)
    except RedisError:
        return None
    if merged is None:
        return None
    values = [f["psi"] for f in measures(merged)["features"].values() if f["psi"] is not None]
    return max(values, default=None)
