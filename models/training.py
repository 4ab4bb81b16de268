"""Training a model of either kind on labelled feature rows, and its evaluation with numpy only
(PR-AUC as average precision, ROC-AUC, recall at 90% precision)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from models.errors import InputError, ModelError
from models.inputs import Normaliser, fit_normaliser, histories_to_array, rows_to_array
from models.modules import ScorerModule, build_model, model_config
from models.scoring import pick_device

Progress = Callable[[int, int, float], None]  # (epoch done, epochs, mean training loss)
MAX_POS_WEIGHT = 1000.0


def train(kind: str, rows: Sequence[Any] | np.ndarray, labels: Sequence[Any] | np.ndarray,
          config: Mapping[str, Any] | None = None, seed: int = 0, device: torch.device | str = "cpu",
          epochs: int = 10, on_progress: Progress | None = None, *, names: Sequence[str],
          lengths: np.ndarray | None = None, log1p: Sequence[bool | None] | None = None,
          batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4) -> tuple[ScorerModule, Normaliser]:
    """Fit the normaliser on the training rows, then a fresh model with class-weighted BCE.

    `rows`: for mlp, feature dicts / feature rows or raw values [R, F] (NaN = null); for
    sequence, per-example histories (lists of rows, oldest first, the labelled event last) or
    raw values [R, N, F] right-padded with `lengths` [R] (a plain list of rows counts as
    histories of length 1). `names` are the spec's model inputs, in order; `log1p` per
    feature as in fit_normaliser (models.inputs.spec_log_mask(spec.features) is a good
    choice). Positives weigh n_negative / n_positive (at most MAX_POS_WEIGHT) in the loss.
    Deterministic for a seed on CPU; the caller's torch RNG state is left as it was.
    Returns the model in eval mode on `device`, and the normaliser."""
    names = tuple(names)
    cfg = model_config(kind, config)
    values, lens = _values(kind, rows, names, lengths, cfg)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if y.shape[0] != values.shape[0] or values.shape[0] == 0:
        raise InputError(f"{values.shape[0]} training rows but {y.shape[0]} labels; need one label per row")
    if not np.all((y == 0) | (y == 1)):
        raise InputError("labels must be 0/1 or booleans")
    fit_on = values if lens is None else values[np.arange(values.shape[1]) < lens[:, None]]
    normaliser = fit_normaliser(names, fit_on, log1p)
    inputs = normaliser.transform(values)
    positives = float(y.sum())
    negatives = y.shape[0] - positives
    pos_weight = min(negatives / positives, MAX_POS_WEIGHT) if positives and negatives else 1.0
    dev = pick_device(device) if isinstance(device, str) else device
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = build_model(kind, normaliser.n_inputs, cfg).to(dev)
        x = torch.from_numpy(inputs).to(dev)
        target = torch.from_numpy(y.astype(np.float32)).to(dev)
        lt = None if lens is None else torch.from_numpy(lens).to(dev)
        _fit(model, x, target, lt, pos_weight, np.random.default_rng(seed), epochs, batch_size,
             lr, weight_decay, on_progress)
    _undo_class_weight(model, pos_weight)
    return model.eval(), normaliser


def _undo_class_weight(model: nn.Module, pos_weight: float) -> None:
    """Positives weighted by w make the model learn log-odds + log(w): shift the output bias back, so
    that scores are probabilities again (a 0.5 threshold means even odds) and the ranking, hence
    PR-AUC and ROC-AUC, stays the same."""
    output = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        output.bias.sub_(math.log(pos_weight))


def _values(kind: str, rows: Any, names: tuple[str, ...], lengths: np.ndarray | None,
            cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(rows, np.ndarray):
        values = np.asarray(rows, dtype=np.float64)
        if kind == "mlp" and values.ndim == 2:
            return values, None
        if kind == "sequence" and values.ndim == 3:
            lens = (np.full(values.shape[0], values.shape[1], dtype=np.int64) if lengths is None
                    else np.asarray(lengths, dtype=np.int64))
            if lens.shape != values.shape[:1] or (lens.size and (lens.min() < 1 or lens.max() > values.shape[1])):
                raise InputError(f"lengths must be [R] integers in 1..{values.shape[1]}")
            return values, lens
        raise InputError(f"a {kind} model trains on raw values of "
                         f"{'[R, F]' if kind == 'mlp' else '[R, N, F]'}, got shape {values.shape}")
    rows = list(rows)
    histories = bool(rows) and not isinstance(rows[0], Mapping)
    if kind == "mlp":
        return rows_to_array([h[-1] for h in rows] if histories else rows, names), None
    return histories_to_array(rows if histories else [[r] for r in rows], names, cfg["seq_len"])


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None,
         pos_weight: float, rng: np.random.Generator, epochs: int, batch_size: int, lr: float,
         weight_decay: float, on_progress: Progress | None) -> None:
    if epochs < 0 or batch_size < 1:
        raise ModelError(f"epochs must be >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=x.device))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(n)).to(x.device)
        total = torch.zeros((), device=x.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            logits = model(x[idx], None if lengths is None else lengths[idx])
            loss = loss_fn(logits, y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
            total += loss.detach() * idx.shape[0]
        if on_progress is not None:
            on_progress(epoch + 1, epochs, float(total) / n)
    model.eval()


def evaluate(scores: Sequence[float] | np.ndarray, labels: Sequence[Any] | np.ndarray) -> dict[str, float | None]:
    """{"pr_auc", "roc_auc", "recall_at_precision_90"} of `scores` against 0/1 `labels`.

    pr_auc is average precision: sum over distinct score thresholds (high to low) of
    (recall gained) * precision there. roc_auc is the probability that a random positive
    outscores a random negative, ties counting one half. recall_at_precision_90 is the
    highest recall at any threshold whose precision is >= 0.9 (0.0 when none). A metric that
    is undefined (no positives; for roc_auc also no negatives) is None."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise InputError(f"{s.shape[0]} scores but {y.shape[0]} labels")
    if not np.all(np.isfinite(s)):
        raise InputError("scores must be finite numbers")
    n, pos = s.shape[0], int(y.sum())
    neg = n - pos
    if pos == 0:
        return {"pr_auc": None, "roc_auc": None, "recall_at_precision_90": None}
    order = np.argsort(-s, kind="stable")
    ranked, hits = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), n - 1]  # last index of each run of equal scores
    tp = np.cumsum(hits)[last].astype(np.float64)
    precision = tp / (last + 1)
    recall = tp / pos
    pr_auc = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    good = precision >= 0.9
    at_90 = float(recall[good].max()) if good.any() else 0.0
    return {"pr_auc": pr_auc, "roc_auc": _roc_auc(s, y, pos, neg), "recall_at_precision_90": at_90}


def _roc_auc(s: np.ndarray, y: np.ndarray, pos: int, neg: int) -> float | None:
    if neg == 0:
        return None
    order = np.argsort(s, kind="stable")
    ranked = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ranked)) + 1]
    ends = np.r_[starts[1:], s.shape[0]]
    ranks = np.empty(s.shape[0])
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # average 1-based rank of ties
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))
