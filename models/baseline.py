"""The baseline model: a hand-set prior that needs no training data, so a fresh stack scores
from its first event; the first retrained model replaces it."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from features.spec import Feature, PipelineSpec
from models.artifacts import save_artifact
from models.inputs import Z_CLIP, Normaliser
from models.manifest import Manifest
from models.modules import ScorerModule, SequenceScorer, build_model
from models.signing import SigningKey

PRIOR_RATE = 0.01  # the score of an unremarkable event: the positive rate eddy expects
# Source fields read as money (the transaction prior applies when a feature aggregates one).
MONEY_FIELD = re.compile(r"amount|price|value|total|spend|cost|fare|balance", re.IGNORECASE)
_MINUTE, _HOUR = 60_000, 3_600_000


def _prior(f: Feature, money: bool) -> tuple[bool, float, float, float]:
    """(log1p, mean, std, weight) of one feature under the prior; weight acts on the z-score."""
    w = f.window_ms or 0
    short = 1.5 if w <= 5 * _MINUTE else 0.75 if w <= _HOUR else 0.3
    lone = math.log1p(1)  # count windows include the event itself: 1 is the calm value
    hundred = math.log1p(100)  # money is centred at 100 units; the weights are mild anyway
    if f.agg == "stddev":
        return True, 0.0, 2.0, 0.25
    if not money:
        return f.agg in ("count", "count_distinct", "sum", "time_since_last"), 0.0, 2.0, 0.0
    if f.agg == "count":
        return True, lone, 1.0, short
    if f.agg == "count_distinct":
        return True, lone, 1.0, short / 2
    if f.agg == "time_since_last":
        return True, math.log1p(3600), 2.0, -0.6
    if f.agg == "sum" and f.of and MONEY_FIELD.search(f.of):
        return True, hundred, 2.0, 0.6 if w <= _HOUR else 0.3
    if f.agg in ("avg", "max") and f.of and MONEY_FIELD.search(f.of):
        return True, hundred, 2.0, 0.2
    return True, 0.0, 2.0, 0.0


def baseline_prior(spec: PipelineSpec) -> tuple[Normaliser, np.ndarray, float]:
    """The prior's normaliser, weights on the F normalised values, and intercept.

    The score is sigmoid(b + sum_i w_i * z_i), z_i the normalised value of feature i (null ->
    0, clipped to +-Z_CLIP), b = logit(PRIOR_RATE). When some feature aggregates a money-like
    field (MONEY_FIELD: a transaction stream such as pipelines/fraud.yaml):

    - count: z = log1p(n) - log1p(1), weight 1.5 for windows <= 5m, 0.75 <= 1h, 0.3 longer (a
      burst of events is the strongest sign of card testing and velocity attacks);
    - count_distinct: the same at half the weight (many merchants, countries, devices);
    - sum of money: z = (log1p(s) - log1p(100)) / 2, weight 0.6 (<= 1h) or 0.3;
    - avg or max of money: same scale, weight 0.2;
    - time_since_last: z = (log1p(secs) - log1p(3600)) / 2, weight -0.6 (a gap of seconds
      rather than hours raises the score; an entity's first event is neutral);
    - stddev: z = log1p(sd) / 2, weight 0.25 (erratic values).

    Any other spec (pipelines/sensors.yaml): only stddev features weigh in (0.25 each), so the
    score stays near PRIOR_RATE and rises mildly with erratic readings; the aggregations whose
    direction cannot be read from a spec (counts of a steady stream, avg/min/max/last of
    unknown units) get weight 0. Missing indicators get weight 0 everywhere. Normalisation is
    set from the aggregation as above, not from data."""
    money = any(f.of is not None and MONEY_FIELD.search(f.of) for f in spec.features)
    params = [_prior(f, money) for f in spec.features]
    log1p, mean, std, weight = (np.array(col) for col in zip(*params, strict=True))
    normaliser = Normaliser(spec.model_inputs, log1p.astype(bool), mean, std)
    return normaliser, weight.astype(np.float64), math.log(PRIOR_RATE / (1 - PRIOR_RATE))


def baseline_model(spec: PipelineSpec, config: dict[str, Any] | None = None) -> tuple[ScorerModule, Normaliser]:
    """A model of the spec's kind whose logit is exactly the prior's linear score of the
    scored row (for a sequence model: of the last row; the GRU is zeroed, so history adds 0)."""
    normaliser, weight, bias = baseline_prior(spec)
    with torch.random.fork_rng(devices=[]):
        model = build_model(spec.model.kind, normaliser.n_inputs, config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        w = np.zeros(normaliser.n_inputs if spec.model.kind == "mlp" else
                     model.config["hidden"] + normaliser.n_inputs)
        offset = 0 if spec.model.kind == "mlp" else model.config["hidden"]
        w[offset:offset + normaliser.n_features] = weight
        head = model.head if isinstance(model, SequenceScorer) else model.net
        _encode_linear(head, w, bias)
    return model.eval(), normaliser


def _encode_linear(net: nn.Sequential, w: np.ndarray, bias: float) -> None:
    """Make the (zeroed) ReLU stack `net` compute w . x + bias exactly: the first hidden unit
    carries w . x + C, with C large enough that ReLU never clips it (inputs are bounded by
    Z_CLIP), later layers pass unit 0 through, and the output removes C."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    weight = torch.as_tensor(w, dtype=torch.float32)
    if len(linears) == 1:
        linears[0].weight[0] = weight
        linears[0].bias[0] = bias
        return
    lift = float(np.abs(w).sum() * Z_CLIP + 1.0)
    linears[0].weight[0] = weight
    linears[0].bias[0] = lift
    for layer in linears[1:]:
        layer.weight[0, 0] = 1.0
    linears[-1].bias[0] = bias - lift


def baseline_artifact(spec: PipelineSpec, directory: str | os.PathLike, key: SigningKey,
                      version: str = "baseline-1") -> Manifest:
    """Write the signed baseline artifact for `spec` into `directory` (see baseline_prior)."""
    model, normaliser = baseline_model(spec)
    return save_artifact(directory, model, normaliser,
                         {"version": version, "spec_hash": spec.spec_hash, "name": spec.model.name,
                          "metrics": {}, "parent": None}, key)
