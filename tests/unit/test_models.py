"""The model layer: one contract suite for every model kind (batch of 1 equals a row of a batch,
deterministic under a seed, save/load round trip, scores in [0, 1], nulls), inputs, training,
evaluation, the baseline and device choice."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from features.errors import ConfigError, EddyError
from features.spec import load_spec
from models.artifacts import load_artifact, save_artifact, verify_artifact
from models.baseline import PRIOR_RATE, baseline_artifact, baseline_model
from models.errors import InputError, ModelError
from models.inputs import (
    Z_CLIP,
    Normaliser,
    fit_normaliser,
    histories_to_array,
    rows_to_array,
    spec_log_mask,
)
from models.modules import KINDS, build_model, model_config
from models.scoring import LoadedModel, pick_device
from models.signing import SigningKey
from models.training import evaluate, train

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
FRAUD = load_spec(PIPELINES / "fraud.yaml")
SENSORS = load_spec(PIPELINES / "sensors.yaml")
NAMES = FRAUD.model_inputs
KEY = SigningKey.from_hex("11" * 32)
SMALL = {"mlp": {"hidden": [16, 8]}, "sequence": {"hidden": 8, "head": [8], "seq_len": 4}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic(n: int, seed: int, null_rate: float = 0.05) -> tuple[list[dict], np.ndarray]:
    """Fraud-shaped feature dicts; the label is 1 exactly when txn_count_1m >= 6 (about 2%)."""
    rng = np.random.default_rng(seed)
    count = rng.poisson(1.2, n) + 1
    count[rng.random(n) < 0.02] += rng.integers(5, 15)
    amount = rng.lognormal(3.5, 1.0, n)
    rows = []
    for i in range(n):
        rows.append({"txn_count_1m": int(count[i]), "amount_sum_1h": float(amount[i] * count[i]),
                     "amount_avg_24h": float(amount[i]), "merchants_24h": int(rng.integers(1, 6)),
                     "secs_since_last": None if rng.random() < null_rate else float(rng.exponential(3600))})
    return rows, (count >= 6).astype(np.int64)


def histories_of(rows: list[dict], seed: int, longest: int = 6) -> list[list[dict]]:
    """Each row preceded by 0..longest-1 other rows: the scored row is last."""
    rng = np.random.default_rng(seed)
    return [[rows[(i + k + 1) % len(rows)] for k in range(rng.integers(0, longest))] + [r]
            for i, r in enumerate(rows)]


def trained(kind: str, seed: int = 7, epochs: int = 2, n: int = 600) -> LoadedModel:
    rows, labels = synthetic(n, seed=1)
    data = rows if kind == "mlp" else histories_of(rows, seed=2)
    model, normaliser = train(kind, data, labels, SMALL[kind], seed=seed, epochs=epochs, names=NAMES,
                              log1p=spec_log_mask(FRAUD.features))
    return LoadedModel(model, normaliser)


def score_any(model: LoadedModel, rows: list[dict], histories: list[list[dict]]) -> np.ndarray:
    return model.score(rows) if model.kind == "mlp" else model.score_sequences(histories)


# ---- the contract every model kind passes ----------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_one_equals_the_same_row_in_a_batch(kind: str) -> None:
    model = trained(kind)
    rows, _ = synthetic(64, seed=3, null_rate=0.3)
    histories = histories_of(rows, seed=4, longest=9)  # some longer than seq_len: truncated
    batch = torch.from_numpy(score_any(model, rows, histories))
    assert batch.shape == (64,) and batch.dtype == torch.float32
    singles = torch.from_numpy(np.concatenate(
        [score_any(model, [r], [h]) for r, h in zip(rows, histories, strict=True)]))
    assert torch.allclose(batch, singles, rtol=0, atol=1e-6)
    assert len(set(batch.tolist())) > 10  # a model that ignores its inputs would pass trivially


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_deterministic_under_a_seed(kind: str) -> None:
    a, b, c = trained(kind, seed=11), trained(kind, seed=11), trained(kind, seed=12)
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    rows, _ = synthetic(32, seed=5)
    histories = histories_of(rows, seed=6)
    assert np.array_equal(score_any(a, rows, histories), score_any(b, rows, histories))


@pytest.mark.parametrize("kind", KINDS)
def test_train_leaves_the_callers_rng_alone(kind: str) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    trained(kind, epochs=1, n=100)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("kind", KINDS)
def test_save_verify_load_score_round_trip(kind: str, tmp_path: Path) -> None:
    model = trained(kind)
    manifest = save_artifact(tmp_path, model.model, model.normaliser,
                             {"version": "v7", "spec_hash": FRAUD.spec_hash, "name": "fraud",
                              "metrics": {"pr_auc": 0.5}, "parent": "baseline-1"}, KEY)
    assert verify_artifact(tmp_path, KEY, FRAUD.spec_hash, NAMES) == manifest
    loaded = load_artifact(tmp_path, KEY, FRAUD.spec_hash, NAMES, device="cpu")
    assert (loaded.version, loaded.kind, loaded.manifest.parent) == ("v7", kind, "baseline-1")
    assert loaded.manifest.config == model.model.config and loaded.manifest.features == NAMES
    assert loaded.manifest.input_layout["columns"] == 2 * len(NAMES)
    rows, _ = synthetic(50, seed=8, null_rate=0.3)
    histories = histories_of(rows, seed=9)
    assert np.array_equal(score_any(loaded, rows, histories), score_any(model, rows, histories))
    for mine, theirs in ((model.normaliser, loaded.normaliser),):
        assert np.array_equal(mine.mean, theirs.mean) and np.array_equal(mine.std, theirs.std)
        assert np.array_equal(mine.log1p, theirs.log1p)


@pytest.mark.parametrize("kind", KINDS)
def test_scores_are_probabilities_even_for_absurd_inputs(kind: str) -> None:
    model = trained(kind)
    wild = [dict.fromkeys(NAMES, v) for v in (0, 1e300, -1e300, float("inf"), float("nan"), -5, None)]
    scores = score_any(model, wild, [[r] for r in wild])
    assert scores.dtype == np.float32 and scores.shape == (7,)
    assert np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize("kind", KINDS)
def test_null_absent_and_nan_are_the_same_missing_value(kind: str) -> None:
    model = trained(kind)
    base = {"txn_count_1m": 2, "amount_sum_1h": 50.0, "amount_avg_24h": 25.0, "merchants_24h": 2}
    rows = [{**base, "secs_since_last": None}, dict(base), {**base, "secs_since_last": float("nan")},
            {**base, "secs_since_last": 30.0}]
    scores = score_any(model, rows, [[r] for r in rows])
    assert scores[0] == scores[1] == scores[2]
    inputs = model.normaliser.rows_to_inputs(rows)
    assert inputs.shape == (4, 10) and inputs.dtype == np.float32
    assert inputs[0, 4] == 0.0 and inputs[0, 9] == 1.0  # value 0, "is missing" 1
    assert inputs[3, 9] == 0.0 and inputs[3, 4] != 0.0
    assert np.all(inputs[:, 5:9] == 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_whole_feature_rows_score_like_their_feature_dicts(kind: str) -> None:
    model = trained(kind)
    feats, _ = synthetic(8, seed=10)
    rows = [{"event_id": f"t-{i}", "card_id": "c-1", "event_time": 0, "features": f, "late": False}
            for i, f in enumerate(feats)]
    assert np.array_equal(model.score(rows), model.score(feats))
    assert np.array_equal(model.score(rows), model.score(rows_to_array(feats, NAMES)))
    assert model.score([]).shape == (0,)


def test_a_sequence_model_reads_history_and_an_mlp_reads_the_last_row() -> None:
    seq, mlp = trained("sequence"), trained("mlp")
    rows, _ = synthetic(6, seed=12)
    last, history = rows[-1], rows
    assert seq.score_sequences([history])[0] != seq.score_sequences([[last]])[0]
    assert seq.score([last])[0] == pytest.approx(seq.score_sequences([[last]])[0], abs=1e-6)
    assert mlp.score_sequences([history])[0] == mlp.score([last])[0]
    values, lengths = histories_to_array([history, [last]], NAMES, seq.seq_len)
    assert values.shape == (2, 4, 5) and lengths.tolist() == [4, 1]
    assert np.allclose(seq.score_sequences(values, lengths), seq.score_sequences([history, [last]]), atol=1e-6)
    assert np.all(np.isnan(values[1, 1:]))  # right padding


# ---- inputs ----------------------------------------------------------------------------------

def test_rows_to_array_fills_nulls_and_refuses_text() -> None:
    rows = [{"a": 1, "b": None}, {"a": 2.5}, {"b": float("inf"), "a": -1}]
    assert np.array_equal(rows_to_array(rows, ["a", "b"]),
                          np.array([[1, np.nan], [2.5, np.nan], [-1, np.inf]]), equal_nan=True)
    assert rows_to_array([{"a": 3}], ["a"]).tolist() == [[3.0]]
    with pytest.raises(InputError, match="'b' is str") as bad:
        rows_to_array([{"a": 1, "b": 2}, {"a": 1, "b": "x"}], ["a", "b"])
    assert bad.value.row == 1


def test_fit_normaliser_statistics_by_hand() -> None:
    values = np.array([[1.0, 0.0, 5.0, np.nan], [3.0, 0.0, 5.0, np.nan], [np.nan, 0.0, 5.0, np.nan],
                       [5.0, 99.0, 5.0, np.nan]])
    norm = fit_normaliser(["a", "b", "c", "d"], values, [False, True, None, None])
    assert norm.log1p.tolist() == [False, True, False, False]
    assert norm.mean[0] == 3.0 and norm.std[0] == pytest.approx(math.sqrt(8 / 3))  # nulls ignored
    logs = np.log1p([0.0, 0.0, 0.0, 99.0])
    assert norm.mean[1] == pytest.approx(logs.mean()) and norm.std[1] == pytest.approx(logs.std())
    assert (norm.mean[2], norm.std[2]) == (5.0, 1.0)  # constant: std 1
    assert (norm.mean[3], norm.std[3]) == (0.0, 1.0)  # always null
    out = norm.transform(np.array([[3.0, 0.0, 5.0, 7.0], [1e9, np.nan, 5.0, np.nan]]))
    assert out.dtype == np.float32 and out.shape == (2, 8)
    assert out[0, :4].tolist() == pytest.approx([0.0, (0 - logs.mean()) / logs.std(), 0.0, 7.0])
    assert out[1, 0] == Z_CLIP and out[1, 1] == 0.0 and out[1, 4:].tolist() == [0, 1, 0, 1]


def test_auto_log_scale_for_skewed_non_negative_features() -> None:
    rng = np.random.default_rng(0)
    values = np.stack([rng.lognormal(3, 1.5, 2000), rng.normal(20, 3, 2000),
                       -rng.lognormal(3, 1.5, 2000)], axis=1)
    assert fit_normaliser(["heavy", "normal", "negative"], values).log1p.tolist() == [True, False, False]


def test_normaliser_travels_as_tensors() -> None:
    norm = fit_normaliser(["a", "b"], np.array([[1.0, 2.0], [3.0, 9.0]]), [True, False])
    back = Normaliser.from_tensors(["a", "b"], norm.to_tensors())
    assert np.array_equal(back.mean, norm.mean) and np.array_equal(back.std, norm.std)
    assert back.log1p.tolist() == [True, False]
    with pytest.raises(ModelError):
        Normaliser(("a",), [False], [0.0], [0.0])


# ---- modules ---------------------------------------------------------------------------------

def test_model_configs_fill_defaults_and_refuse_nonsense() -> None:
    assert model_config("mlp") == {"hidden": [64, 32], "dropout": 0.0}
    assert model_config("sequence", {"seq_len": 16})["seq_len"] == 16
    for kind, bad in (("mlp", {"hiden": [3]}), ("mlp", {"hidden": [0]}), ("sequence", {"seq_len": 0}),
                      ("sequence", {"hidden": True}), ("gbdt", {})):
        with pytest.raises(ModelError):
            model_config(kind, bad)
    with pytest.raises(ModelError):
        build_model("mlp", 0, {})
    x = torch.zeros(3, 4, 10)
    assert build_model("mlp", 10, {}).eval()(x[:, 0]).shape == (3,)
    assert build_model("sequence", 10, {}).eval()(x, torch.tensor([1, 2, 4])).shape == (3,)


# ---- training and evaluation -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_training_learns_a_label_that_depends_on_one_feature(kind: str) -> None:
    rows, labels = synthetic(4000, seed=20)
    test_rows, test_labels = synthetic(3000, seed=21)
    assert 0.01 < labels.mean() < 0.04
    progress: list[tuple[int, int, float]] = []
    data = rows if kind == "mlp" else histories_of(rows, seed=22)
    model, normaliser = train(kind, data, labels, SMALL[kind], seed=0, epochs=8, names=NAMES,
                              on_progress=lambda *a: progress.append(a), batch_size=128, lr=3e-3)
    loaded = LoadedModel(model, normaliser)
    scores = score_any(loaded, test_rows, histories_of(test_rows, seed=23))
    metrics = evaluate(scores, test_labels)
    assert metrics["pr_auc"] > 0.9 and metrics["roc_auc"] > 0.97, metrics
    assert [p[0] for p in progress] == list(range(1, 9)) and progress[-1][2] < progress[0][2]


def test_evaluate_matches_a_hand_computed_example() -> None:
    # Ranked: + - + - - +. Thresholds give (precision, recall): (1, 1/3) (1/2, 1/3) (2/3, 2/3)
    # (1/2, 2/3) (2/5, 2/3) (1/2, 1). AP = 1/3*1 + 1/3*2/3 + 1/3*1/2 = 13/18. Positive > negative
    # pairs: 3 + 2 + 0 of 9. Only the first threshold reaches precision 0.9: recall 1/3.
    m = evaluate([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 0, 1, 0, 0, 1])
    assert abs(m["pr_auc"] - 13 / 18) < 1e-12
    assert abs(m["roc_auc"] - 5 / 9) < 1e-12
    assert abs(m["recall_at_precision_90"] - 1 / 3) < 1e-12
    # Ties: one threshold at 0.5 with precision 1/2, recall 1; the tied pair counts one half.
    tied = evaluate(np.array([0.5, 0.2, 0.5]), np.array([True, False, False]))
    assert tied == {"pr_auc": 0.5, "roc_auc": 0.75, "recall_at_precision_90": 0.0}
    assert evaluate([0.1, 0.9, 0.8], [0, 1, 1]) == {"pr_auc": 1.0, "roc_auc": 1.0, "recall_at_precision_90": 1.0}
    assert evaluate([0.3, 0.2], [0, 0]) == {"pr_auc": None, "roc_auc": None, "recall_at_precision_90": None}
    assert evaluate([0.3, 0.2], [1, 1])["roc_auc"] is None
    with pytest.raises(InputError):
        evaluate([0.1, 0.2], [1])


# ---- baseline --------------------------------------------------------------------------------

BURST = {"txn_count_1m": 8, "amount_sum_1h": 2400.0, "amount_avg_24h": 300.0, "merchants_24h": 6,
         "secs_since_last": 5.0}
CALM = {"txn_count_1m": 1, "amount_sum_1h": 40.0, "amount_avg_24h": 35.0, "merchants_24h": 2,
        "secs_since_last": 86_400.0}


@pytest.mark.parametrize("spec", [FRAUD, SENSORS], ids=["fraud", "sensors"])
def test_baseline_builds_saves_verifies_loads_and_scores(spec, tmp_path: Path) -> None:
    manifest = baseline_artifact(spec, tmp_path, KEY)
    assert (manifest.version, manifest.parent, manifest.name) == ("baseline-1", None, spec.model.name)
    assert verify_artifact(tmp_path, KEY, spec.spec_hash, spec.model_inputs).sha256 == manifest.sha256
    loaded = load_artifact(tmp_path, KEY, spec.spec_hash, spec.model_inputs)
    rows = [dict.fromkeys(spec.model_inputs, 1.0), dict.fromkeys(spec.model_inputs)]
    scores = loaded.score(rows)
    assert np.all((scores > 0) & (scores < 1))
    assert scores[1] == pytest.approx(PRIOR_RATE, rel=1e-4)  # all null: the prior rate


def test_fraud_baseline_scores_a_burst_above_a_calm_row(tmp_path: Path) -> None:
    baseline_artifact(FRAUD, tmp_path, KEY)
    loaded = load_artifact(tmp_path, KEY, FRAUD.spec_hash, NAMES)
    burst, calm = loaded.score([BURST, CALM])
    assert burst > 0.5 > 0.01 > calm
    faster = loaded.score([{**CALM, "txn_count_1m": n} for n in (1, 3, 6, 12)])
    assert np.all(np.diff(faster) > 0)


def test_sensor_baseline_is_near_constant() -> None:
    model, norm = baseline_model(SENSORS)
    loaded = LoadedModel(model, norm)
    rng = np.random.default_rng(0)
    values = np.abs(rng.normal(20, 10, (200, len(SENSORS.model_inputs))))
    scores = loaded.score(values)
    assert scores.min() > 0.005 and scores.max() < 0.1


def test_sequence_baseline_scores_the_last_row_like_the_mlp_baseline(tmp_path: Path) -> None:
    seq_spec = dataclasses.replace(FRAUD, model=dataclasses.replace(FRAUD.model, kind="sequence"))
    baseline_artifact(seq_spec, tmp_path / "seq", KEY)
    seq = load_artifact(tmp_path / "seq", KEY, seq_spec.spec_hash, NAMES)
    mlp = LoadedModel(*baseline_model(FRAUD))
    assert seq.kind == "sequence"
    expected = mlp.score([BURST, CALM])
    got = seq.score_sequences([[CALM, CALM, BURST], [BURST, BURST, BURST, BURST, BURST, CALM]])
    assert np.allclose(got, expected, atol=1e-6) and got[0] > got[1]


# ---- devices ---------------------------------------------------------------------------------

def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not one of"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(EddyError, match="no CUDA device"):
            pick_device("cuda")


@pytest.mark.parametrize("kind", KINDS)
def test_warm_up_runs_every_batch_size(kind: str) -> None:
    model = trained(kind, epochs=1, n=100)
    model.warm_up((1, 3))
    with pytest.raises(InputError):
        model.score_inputs(np.zeros((2, 3), np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_scores_match_cpu(kind: str) -> None:
    model = trained(kind)
    rows, _ = synthetic(300, seed=30)
    histories = histories_of(rows, seed=31)
    on_gpu = model.to("cuda")
    on_gpu.warm_up((1, 64))
    assert on_gpu.device.type == "cuda" and model.device.type == "cpu"
    assert np.allclose(score_any(on_gpu, rows, histories), score_any(model, rows, histories), atol=1e-5)
    singles = np.concatenate([score_any(on_gpu, [r], [h]) for r, h in zip(rows[:20], histories[:20], strict=True)])
    assert np.allclose(singles, score_any(on_gpu, rows[:20], histories[:20]), atol=1e-5)
