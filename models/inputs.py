"""Feature rows -> model inputs: float32 [..., 2F] in spec order, F normalised values then F
"is missing" indicators. The normalisation statistics are fitted from training rows (or set by
the baseline from the spec) and travel inside the artifact as tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from models.errors import InputError, ModelError

# Aggregations whose values are non-negative and heavy-tailed: modelled on a log1p scale.
LOG_AGGS = frozenset({"count", "count_distinct", "sum", "stddev", "time_since_last"})
# Normalised values are clipped to +-Z_CLIP so one absurd input cannot dominate a score.
Z_CLIP = 10.0
# A column fitted with log1p=None goes on the log scale when it is non-negative and this skewed.
AUTO_LOG_SKEW = 2.0
_MIN_STD = 1e-6


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """log1p that keeps the sign, so a negative sum (refunds) stays finite and monotone."""
    return np.sign(x) * np.log1p(np.abs(x))


def feature_values(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The feature dicts of `rows`: a feature row's "features" mapping, or the row itself.

    Feature values are numbers or null, never mappings, so a mapping under "features" is
    unambiguous."""
    if rows and isinstance(rows[0].get("features"), Mapping):
        return [r["features"] for r in rows]
    return list(rows)


def rows_to_array(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
    """float64 [B, F] of the features `names` (in that order) of each row; null, absent and
    non-finite values become NaN. Rows are feature dicts or whole feature rows."""
    names = tuple(names)
    dicts = feature_values(rows)
    if not dicts:
        return np.empty((0, len(names)), dtype=np.float64)
    get = itemgetter(*names)
    table: list[tuple[Any, ...]]
    try:
        if len(names) == 1:
            table = [(get(d),) for d in dicts]
        else:
            table = [get(d) for d in dicts]
    except KeyError:  # a row without some feature: treat it as null (rare, so the slow path)
        table = [tuple(d.get(n) for n in names) for d in dicts]
    try:
        return np.array(table, dtype=np.float64)
    except (TypeError, ValueError):
        raise _bad_value(dicts, names) from None


def _bad_value(dicts: Sequence[Mapping[str, Any]], names: Sequence[str]) -> InputError:
    for i, d in enumerate(dicts):
        for n in names:
            v = d.get(n)
            if v is not None and not isinstance(v, int | float | np.number):
                return InputError(f"row {i}: feature {n!r} is {type(v).__name__} {v!r}; "
                                  "feature values must be numbers or null", row=i)
    return InputError("feature rows must map each feature name to a number or null")


@dataclass(frozen=True, eq=False)
class Normaliser:
    """Per-feature transform (optional signed log1p) then standardisation with `mean`/`std`."""

    names: tuple[str, ...]
    log1p: np.ndarray  # bool [F]
    mean: np.ndarray  # float64 [F], on the transformed scale
    std: np.ndarray  # float64 [F], > 0

    def __post_init__(self) -> None:
        f = len(self.names)
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "log1p", np.asarray(self.log1p, dtype=bool).reshape(-1))
        object.__setattr__(self, "mean", np.asarray(self.mean, dtype=np.float64).reshape(-1))
        object.__setattr__(self, "std", np.asarray(self.std, dtype=np.float64).reshape(-1))
        if f == 0 or len(set(self.names)) != f:
            raise ModelError("a normaliser needs at least one feature and distinct names")
        if not (self.log1p.shape == self.mean.shape == self.std.shape == (f,)):
            raise ModelError(f"normaliser statistics must have one entry per feature ({f})")
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std)) and np.all(self.std > 0)):
            raise ModelError("normaliser means must be finite and standard deviations > 0")

    @property
    def n_features(self) -> int:
        return len(self.names)

    @property
    def n_inputs(self) -> int:
        return 2 * len(self.names)

    def transform(self, values: np.ndarray) -> np.ndarray:
        """float32 [..., 2F] from raw values [..., F] (NaN = null): normalised values with nulls
        at 0 and clipped to +-Z_CLIP, then the missing indicators (1.0 = null)."""
        values = np.asarray(values, dtype=np.float64)
        f = self.n_features
        if values.ndim < 1 or values.shape[-1] != f:
            raise InputError(f"expected raw feature values [..., {f}] ({', '.join(self.names)}), "
                             f"got shape {values.shape}")
        missing = ~np.isfinite(values)
        x = np.where(self.log1p, signed_log1p(values), values)
        z = (x - self.mean) / self.std
        out = np.empty(values.shape[:-1] + (2 * f,), dtype=np.float32)
        np.clip(np.where(missing, 0.0, z), -Z_CLIP, Z_CLIP, out=out[..., :f], casting="same_kind")
        out[..., f:] = missing
        return out

    def rows_to_inputs(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """float32 [B, 2F] straight from feature dicts or feature rows."""
        return self.transform(rows_to_array(rows, self.names))

    def to_tensors(self) -> dict[str, Any]:
        """The statistics as tensors for the artifact's safetensors file (names prefixed norm.)."""
        import torch

        return {"norm.log1p": torch.from_numpy(self.log1p.astype(np.uint8)),
                "norm.mean": torch.from_numpy(self.mean.copy()),
                "norm.std": torch.from_numpy(self.std.copy())}

    @classmethod
    def from_tensors(cls, names: Sequence[str], tensors: Mapping[str, Any]) -> Normaliser:
        """The inverse of to_tensors; ModelError when a tensor is absent or of the wrong shape."""
        try:
            return cls(tuple(names), tensors["norm.log1p"].numpy().astype(bool),
                       tensors["norm.mean"].double().numpy(), tensors["norm.std"].double().numpy())
        except KeyError as exc:
            raise ModelError(f"normalisation tensor {exc.args[0]!r} is missing") from None

    def summary(self) -> dict[str, dict[str, Any]]:
        """Human-readable statistics for the manifest (the tensors are authoritative)."""
        return {n: {"transform": "signed_log1p" if lg else "identity", "mean": float(m), "std": float(s)}
                for n, lg, m, s in zip(self.names, self.log1p, self.mean, self.std, strict=True)}

    def layout(self) -> dict[str, Any]:
        """Where each input column comes from, for the manifest."""
        f = self.n_features
        return {"columns": 2 * f, "values": [0, f], "missing": [f, 2 * f], "order": list(self.names),
                "missing_value": 0.0, "clip": Z_CLIP}


def fit_normaliser(names: Sequence[str], values: np.ndarray,
                   log1p: Sequence[bool | None] | None = None) -> Normaliser:
    """Fit per-feature statistics on raw training values [R, F] (NaN = null), ignoring nulls.

    `log1p[i]` True/False forces the log scale for feature i; None (the default for all) puts
    it on the log scale when its values are non-negative and skewed (skewness > AUTO_LOG_SKEW).
    A feature that is always null or constant gets std 1 so it normalises to a constant."""
    values = np.asarray(values, dtype=np.float64)
    f = len(names)
    if values.ndim != 2 or values.shape[1] != f:
        raise InputError(f"expected raw training values [R, {f}], got shape {values.shape}")
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    safe = np.where(finite, values, 0.0)
    choice = [None] * f if log1p is None else list(log1p)
    if len(choice) != f:
        raise ModelError(f"log1p needs one entry per feature ({f}), got {len(choice)}")
    auto = _auto_log(safe, finite, count)
    mask = np.array([auto[i] if c is None else bool(c) for i, c in enumerate(choice)], dtype=bool)
    x = np.where(finite, np.where(mask, signed_log1p(safe), safe), 0.0)
    n = np.maximum(count, 1)
    mean = x.sum(axis=0) / n
    var = (np.where(finite, x - mean, 0.0) ** 2).sum(axis=0) / n
    std = np.sqrt(var)
    std = np.where(std > _MIN_STD, std, 1.0)
    return Normaliser(tuple(names), mask, mean, std)


def _auto_log(safe: np.ndarray, finite: np.ndarray, count: np.ndarray) -> np.ndarray:
    n = np.maximum(count, 1)
    mean = safe.sum(axis=0) / n
    dev = np.where(finite, safe - mean, 0.0)
    var = (dev ** 2).sum(axis=0) / n
    third = (dev ** 3).sum(axis=0) / n
    skew = np.divide(third, var ** 1.5, out=np.zeros_like(third), where=var > 0)
    nonneg = np.where(finite, safe, 0.0).min(axis=0, initial=0.0) >= 0
    return nonneg & (skew > AUTO_LOG_SKEW) & (count > 0)


def spec_log_mask(features: Sequence[Any]) -> tuple[bool | None, ...]:
    """The log-scale choice per spec feature (objects with `.agg`): True for counts, sums,
    stddevs and time since last; None (decide from data) for avg, min, max and last."""
    return tuple(True if f.agg in LOG_AGGS else None for f in features)


def histories_to_array(histories: Sequence[Sequence[Mapping[str, Any]]], names: Sequence[str],
                       seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw values [B, seq_len, F] (NaN = null, right-padded) and lengths [B] from each entity's
    rows, oldest first, the scored event last; only the last `seq_len` rows of a history count."""
    kept = [h[-seq_len:] for h in histories]
    lengths = np.fromiter((len(h) for h in kept), dtype=np.int64, count=len(kept))
    if lengths.size and lengths.min() == 0:
        raise InputError(f"history {int(np.argmin(lengths))} is empty; each needs at least the scored row")
    flat = rows_to_array([r for h in kept for r in h], names)
    values = np.full((len(kept), seq_len, len(names)), np.nan)
    if flat.size:
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        values[np.repeat(np.arange(len(kept)), lengths), np.arange(flat.shape[0]) - starts] = flat
    return values, lengths
