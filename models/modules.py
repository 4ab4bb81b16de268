"""The model kinds behind one interface: `forward(x, lengths=None) -> logit [B]`, score = sigmoid.

`mlp` reads one input row per entity, [B, 2F]. `sequence` reads the entity's last N input rows,
[B, N, 2F], right-padded (row 0 oldest, row lengths[b]-1 the event being scored); a GRU
summarises them and a head sees that summary next to the current row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from features.spec import MODEL_KINDS as KINDS
from models.errors import ModelError

DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [64, 32], "dropout": 0.0},
    "sequence": {"hidden": 32, "layers": 1, "head": [32], "seq_len": 8, "dropout": 0.0},
}


def model_config(kind: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The complete config of `kind` (defaults filled in, values checked): what the manifest stores."""
    if kind not in DEFAULTS:
        raise ModelError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
    given = dict(config or {})
    unknown = sorted(set(given) - set(DEFAULTS[kind]))
    if unknown:
        raise ModelError(f"unknown {kind} config key(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(DEFAULTS[kind])}")
    full = {**DEFAULTS[kind], **given}
    full["dropout"] = _number(full["dropout"], "dropout", 0.0, 0.9)
    if kind == "mlp":
        full["hidden"] = _sizes(full["hidden"], "hidden")
    else:
        full["hidden"] = _int(full["hidden"], "hidden", 1)
        full["layers"] = _int(full["layers"], "layers", 1)
        full["head"] = _sizes(full["head"], "head")
        full["seq_len"] = _int(full["seq_len"], "seq_len", 1)
    return full


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ModelError(f"model config {name!r} must be an integer >= {low}, got {value!r}")
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ModelError(f"model config {name!r} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _sizes(value: Any, name: str) -> list[int]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ModelError(f"model config {name!r} must be a list of layer sizes, got {value!r}")
    return [_int(v, name, 1) for v in value]


def _mlp_layers(n_in: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(n_in, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        n_in = width
    layers.append(nn.Linear(n_in, 1))
    return nn.Sequential(*layers)


class MLPScorer(nn.Module):
    """Feed-forward scorer: inputs [B, 2F] -> logit [B]."""

    kind = "mlp"

    def __init__(self, n_inputs: int, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = model_config("mlp", config)
        self.n_inputs = n_inputs
        self.net = _mlp_layers(n_inputs, self.config["hidden"], self.config["dropout"])

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 3:  # a history: score its last valid row
            x = last_rows(x, lengths)
        return self.net(x).squeeze(-1)


class SequenceScorer(nn.Module):
    """GRU over the last N rows; head on [GRU state at the last valid row, that row] -> logit [B]."""

    kind = "sequence"

    def __init__(self, n_inputs: int, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        cfg = self.config = model_config("sequence", config)
        self.n_inputs = n_inputs
        self.gru = nn.GRU(n_inputs, cfg["hidden"], num_layers=cfg["layers"], batch_first=True,
                          dropout=cfg["dropout"] if cfg["layers"] > 1 else 0.0)
        self.head = _mlp_layers(cfg["hidden"] + n_inputs, cfg["head"], cfg["dropout"])

    @property
    def seq_len(self) -> int:
        return self.config["seq_len"]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2:  # single rows: histories of length 1
            x = x.unsqueeze(1)
            lengths = None
        # Right padding and a causal GRU: the output at step len-1 never sees the padding.
        out, _ = self.gru(x)
        idx = _last_index(x, lengths)
        rows = torch.arange(x.shape[0], device=x.device)
        return self.head(torch.cat([out[rows, idx], x[rows, idx]], dim=-1)).squeeze(-1)


def _last_index(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if lengths is None:
        return torch.full((x.shape[0],), x.shape[1] - 1, dtype=torch.long, device=x.device)
    return (lengths.to(device=x.device, dtype=torch.long) - 1).clamp(0, x.shape[1] - 1)


def last_rows(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """[B, 2F]: the last valid row of each right-padded history [B, N, 2F]."""
    idx = _last_index(x, lengths)
    return x[torch.arange(x.shape[0], device=x.device), idx]


# A model of one of KINDS: an nn.Module with `kind`, `config` and `n_inputs`, which artifacts and scoring read.
ScorerModule = MLPScorer | SequenceScorer


def build_model(kind: str, n_inputs: int, config: Mapping[str, Any] | None = None) -> ScorerModule:
    """A fresh (randomly initialised, from torch's current RNG) model of `kind` for [.., n_inputs]."""
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
        raise ModelError(f"n_inputs must be a positive integer, got {n_inputs!r}")
    if kind == "mlp":
        return MLPScorer(n_inputs, config)
    if kind == "sequence":
        return SequenceScorer(n_inputs, config)
    raise ModelError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
