"""Drift (models.drift): the reference bins, PSI, the scorer's sliding window against a recount from
scratch, the reference signed into the manifest, calibration error, and the drift retrain trigger."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from features.spec import load_spec
from models.artifacts import MANIFEST_FILE, save_artifact, verify_artifact
from models.baseline import baseline_model
from models.continuous import RetrainPolicy
from models.drift import DRIFT_BOUND, DriftWindow, measures, psi, reference
from models.errors import BadSignature
from models.live import calibration_error
from models.signing import SigningKey

SPEC = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "fraud.yaml")
NAMES = ("a", "b", "c")

KEY = SigningKey.from_hex("33" * 32)


def sample(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    values = np.column_stack([rng.lognormal(3.0 + shift, 1.0, n), rng.poisson(2.0, n).astype(float),
                              rng.normal(0.0, 1.0, n)])
    values[rng.random(n) < 0.1, 2] = np.nan  # c is null a tenth of the time
    return values


def test_reference_bins_hold_tenths_and_the_null_share():
    rng = np.random.default_rng(1)
    ref = reference(sample(rng, 20_000), NAMES, rng.random(20_000))
    a, b, c = (ref["features"][n] for n in NAMES)
    assert len(a["edges"]) == 9 and np.allclose(a["shares"], 0.1, atol=0.002)
    assert len(b["edges"]) < 9 and sum(b["shares"]) == pytest.approx(1.0)  # repeated values: fewer edges
    assert c["null_share"] == pytest.approx(0.1, abs=0.01) and a["null_share"] == 0.0
    assert ref["rows"] == 20_000 and len(ref["score"]["shares"]) == 10


def test_psi_is_the_textbook_sum_and_separates_a_shift_from_sampling_noise():
    assert psi([0.5, 0.5], [30, 10]) == pytest.approx((0.75 - 0.5) * np.log(1.5) + (0.25 - 0.5) * np.log(0.5))
    assert psi([0.5, 0.5], [0, 0]) is None
    rng = np.random.default_rng(2)
    ref = reference(sample(rng, 20_000), NAMES, rng.random(20_000))
    same, shifted = DriftWindow(ref, NAMES, "v1", 5000), DriftWindow(ref, NAMES, "v1", 5000)
    same.add(sample(rng, 5000), rng.random(5000))
    shifted.add(sample(rng, 5000, shift=1.0), rng.random(5000))
    calm, moved = measures(same.snapshot())["features"], measures(shifted.snapshot())["features"]
    assert all(calm[n]["psi"] < 0.02 for n in NAMES)
    assert moved["a"]["psi"] > DRIFT_BOUND and moved["b"]["psi"] < 0.02 and moved["c"]["psi"] < 0.02


def recount(ref: dict, values: np.ndarray, scores: np.ndarray) -> dict:
    """The snapshot's counts from scratch over the given (last) rows."""
    out = {}
    for j, name in enumerate(NAMES):
        column = values[:, j]
        finite = column[np.isfinite(column)]
        edges = np.asarray(ref["features"][name]["edges"])
        out[name] = (np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1).tolist(),
                     int((~np.isfinite(column)).sum()))
    edges = np.asarray(ref["score"]["edges"])
    out["score"] = np.bincount(np.searchsorted(edges, scores, side="right"), minlength=edges.size + 1).tolist()
    return out


def test_the_sliding_window_equals_a_recount_of_its_last_rows_whatever_the_batches():
    rng = np.random.default_rng(3)
    ref = reference(sample(rng, 5000), NAMES, rng.random(5000))
    window = DriftWindow(ref, NAMES, "v1", size=700)
    seen_values, seen_scores = np.empty((0, 3)), np.empty(0)
    for n in (1, 5, 300, 699, 1, 2000, 13, 700, 0, 450):
        values, scores = sample(rng, n, shift=rng.random()), rng.random(n)
        window.add(values, scores)
        seen_values, seen_scores = np.vstack([seen_values, values]), np.r_[seen_scores, scores]
        snap = window.snapshot()
        expected = recount(ref, seen_values[-700:], seen_scores[-700:])
        assert snap["rows"] == min(700, len(seen_scores))
        for name in NAMES:
            assert (snap["features"][name]["counts"], snap["features"][name]["nulls"]) == expected[name]
        assert snap["score"]["counts"] == expected["score"]


def test_the_reference_is_signed_into_the_manifest(tmp_path):
    model, normaliser = baseline_model(SPEC)
    rng = np.random.default_rng(4)
    ref = reference(rng.random((500, len(SPEC.model_inputs))), SPEC.model_inputs, rng.random(500))
    manifest = save_artifact(tmp_path, model, normaliser, {"version": "v1", "spec_hash": SPEC.spec_hash,
                                                           "reference": ref}, KEY)
    assert manifest.reference == ref
    assert verify_artifact(tmp_path, KEY, SPEC.spec_hash, None).reference == ref
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    data["reference"]["features"][SPEC.model_inputs[0]]["shares"][0] += 0.5  # a reference that hides drift
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BadSignature):
        verify_artifact(tmp_path, KEY, SPEC.spec_hash, None)


def test_calibration_error_is_the_row_weighted_gap_per_score_bin():
    scores = np.array([0.05, 0.05, 0.95, 0.95])
    assert calibration_error(scores, np.array([0, 0, 1, 1])) == pytest.approx(0.05)
    assert calibration_error(scores, np.array([1, 1, 0, 0])) == pytest.approx(0.95)
    assert calibration_error(np.array([]), np.array([])) is None


def test_drift_above_the_bound_retrains_at_most_once_per_cooldown():
    policy = RetrainPolicy(drift_bound=0.2, drift_cooldown_s=600)
    assert not policy.due(0, 0.0, drift=0.9)      # the first look only starts counting
    assert not policy.due(0, 599.0, drift=0.9)    # within the cooldown of the start
    assert not policy.due(0, 700.0, drift=0.19)   # below the bound
    assert not policy.due(0, 700.0, drift=None)   # not measured
    assert policy.due(0, 700.0, drift=0.21)
    policy.done(0, 700.0)
    assert not policy.due(0, 1000.0, drift=0.9)
    assert policy.due(0, 1300.0, drift=0.9)
