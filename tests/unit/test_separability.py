"""The generator's fraud is learnable from the spec's windowed features, and not from the amount alone."""

from __future__ import annotations

import numpy as np

from tests.separability import compare, pr_auc, roc_auc


def test_windowed_features_clearly_beat_amount_alone_but_not_trivially():
    result = compare(40_000, seed=9)
    features, amount = result["windowed_features"], result["amount_only"]
    assert features["pr_auc"] > 3 * amount["pr_auc"]
    assert features["pr_auc"] > 0.4 and features["roc_auc"] > 0.85
    assert amount["pr_auc"] < 0.3
    assert features["pr_auc"] < 0.99  # something is left to learn


def test_metric_helpers_on_a_hand_computed_example():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([1.0, 0.0, 1.0, 0.0])
    assert pr_auc(scores, labels) == (1 / 1 + 2 / 3) / 2
    assert roc_auc(scores, labels) == 0.75
