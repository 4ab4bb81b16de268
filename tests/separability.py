"""How learnable the generator's fraud is: a logistic model on the spec's windowed features against one
on the amount alone, time-ordered split. Used by a unit test and for the figures in the notes:
    .venv/bin/python -m tests.separability 300000
"""

from __future__ import annotations

import sys

import numpy as np
import orjson

from features.spec import load_spec
from features.windows import FeatureLogic
from streams.generator import GeneratorConfig, TransactionGenerator


def dataset(n: int, seed: int = 5, fraud_rate: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(windowed features [n, F], amount [n], is_fraud [n]) over a day of backfilled history."""
    spec = load_spec("pipelines/fraud.yaml")
    logic = FeatureLogic(spec)
    gen = TransactionGenerator(GeneratorConfig(seed=seed, fraud_rate=fraud_rate, cards=5000,
                                               start_ms=1_795_000_000_000, mean_gap_ms=86_400_000 / n))
    batch = gen.batch(n)
    states: dict = {}
    rows = np.zeros((n, len(spec.feature_names)), dtype=np.float64)
    amounts = np.zeros(n)
    for i, raw in enumerate(batch.values):
        event = orjson.loads(raw)
        state = states.get(event["card_id"])
        if state is None:
            state = states[event["card_id"]] = logic.new_state()
        row = logic.update(state, int(batch.event_time_ms[i]), event)
        rows[i] = [np.nan if v is None else v for v in row.features.values()]
        amounts[i] = event["amount"]
    return rows, amounts, batch.is_fraud.astype(np.float64)


def _design(x: np.ndarray) -> np.ndarray:
    """log1p of non-negative inputs, a missing indicator for nulls (first event of a card)."""
    missing = np.isnan(x)
    x = np.log1p(np.where(missing, 0.0, np.maximum(x, 0.0)))
    return np.hstack([x, missing.astype(np.float64)])


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 400, lr: float = 0.5) -> tuple[np.ndarray, np.ndarray, float]:
    """Class-weighted logistic regression by gradient descent on standardised inputs."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    z = (x - mu) / sd
    w, b = np.zeros(z.shape[1]), 0.0
    pos = y.mean()
    weight = np.where(y == 1, 0.5 / max(pos, 1e-9), 0.5 / max(1 - pos, 1e-9))
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        g = (p - y) * weight / len(y)
        w -= lr * (z.T @ g)
        b -= lr * g.sum()
    return w / sd, mu, b - float((mu / sd) @ w)


def pr_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision."""
    order = np.argsort(-scores, kind="stable")
    y = labels[order]
    tp = np.cumsum(y)
    precision = tp / np.arange(1, len(y) + 1)
    return float((precision * y).sum() / max(y.sum(), 1))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


def compare(n: int, seed: int = 5) -> dict[str, dict[str, float]]:
    feats, amounts, y = dataset(n, seed)
    split = int(n * 0.7)  # time-ordered: train on the first 70% of the day, test on the rest
    out = {}
    for name, x in (("windowed_features", _design(feats)), ("amount_only", _design(amounts[:, None]))):
        w, _mu, b = fit_logistic(x[:split], y[:split])
        scores = x[split:] @ w + b
        out[name] = {"pr_auc": round(pr_auc(scores, y[split:]), 4), "roc_auc": round(roc_auc(scores, y[split:]), 4)}
    out["test_fraud_rate"] = {"value": round(float(y[split:].mean()), 4)}
    return out


if __name__ == "__main__":
    print(orjson.dumps(compare(int(sys.argv[1]) if len(sys.argv) > 1 else 300_000), option=orjson.OPT_INDENT_2).decode())
