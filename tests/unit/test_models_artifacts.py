"""Artifact refusals (each with its own error, before any weight is parsed) and the signed
model-updates message."""

from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from features.errors import ConfigError, EddyError
from features.spec import load_spec
from models.artifacts import (
    MANIFEST_FILE,
    MESSAGE_FIELDS,
    WEIGHTS_FILE,
    Manifest,
    check_safetensors_layout,
    load_artifact,
    model_update_message,
    save_artifact,
    sign_message,
    verify_artifact,
    verify_message,
)
from models.baseline import baseline_artifact, baseline_model
from models.errors import (
    ArtifactError,
    BadManifest,
    BadSignature,
    ChecksumMismatch,
    IncompatibleWeights,
    NotSafetensors,
    SpecMismatch,
)
from models.modules import build_model
from models.signing import SigningKey

SPEC = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "fraud.yaml")
NAMES = SPEC.model_inputs
KEY = SigningKey.from_hex("11" * 32)
OTHER = SigningKey.from_hex("22" * 32)
REQUIRED = ("format", "version", "name", "kind", "config", "spec_hash", "features", "input_layout",
            "normalisation", "metrics", "created_at", "parent", "sha256", "signature")


class _Marker:
    """Unpickling this touches `path`: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    baseline_artifact(SPEC, tmp_path, KEY, version="v1")
    return tmp_path


def manifest_of(root: Path) -> dict:
    return json.loads((root / MANIFEST_FILE).read_text())


def resign(root: Path, change: Callable[[dict], None] = lambda m: None, key: SigningKey = KEY,
           sign: bool = True) -> None:
    """Rewrite the manifest with the weights' real sha256, then `change`, then a valid signature."""
    data = manifest_of(root)
    data["sha256"] = hashlib.sha256((root / WEIGHTS_FILE).read_bytes()).hexdigest()
    data.pop("signature")
    change(data)
    if sign:
        data["signature"] = sign_message(data, key)
    (root / MANIFEST_FILE).write_text(json.dumps(data))


def refused(root: Path, error: type[ArtifactError], key: SigningKey = KEY, spec_hash: str | None = SPEC.spec_hash,
            features: tuple[str, ...] | None = NAMES) -> str:
    with pytest.raises(error) as verify_err:
        verify_artifact(root, key, spec_hash, features)
    with pytest.raises(error):
        load_artifact(root, key, spec_hash, features)
    message = str(verify_err.value)
    assert "\n" not in message and message
    return message


def test_the_refusals_are_distinct_eddy_errors() -> None:
    kinds = {BadSignature, ChecksumMismatch, NotSafetensors, SpecMismatch, BadManifest, IncompatibleWeights}
    assert len(kinds) == 6 and all(issubclass(k, ArtifactError) and issubclass(k, EddyError) for k in kinds)
    assert all(not issubclass(a, b) for a in kinds for b in kinds if a is not b)


def test_a_valid_artifact_verifies(artifact: Path) -> None:
    manifest = verify_artifact(artifact, KEY, SPEC.spec_hash, NAMES)
    assert isinstance(manifest, Manifest) and manifest.version == "v1"
    assert sorted(manifest_of(artifact)) == sorted(REQUIRED)
    assert manifest.sha256 == hashlib.sha256((artifact / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert verify_artifact(artifact, KEY, None, None) == manifest  # None skips the spec checks


def test_load_leaves_the_callers_rng_alone(artifact: Path) -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    load_artifact(artifact, KEY, SPEC.spec_hash, NAMES)
    assert torch.equal(torch.get_rng_state(), before)


def test_signed_with_another_key(artifact: Path) -> None:
    resign(artifact, key=SigningKey.generate())
    assert "signature" in refused(artifact, BadSignature)


def test_verified_with_another_key(artifact: Path) -> None:
    refused(artifact, BadSignature, key=OTHER)


def test_manifest_edited_without_resigning(artifact: Path) -> None:
    data = manifest_of(artifact)
    data["metrics"] = {"pr_auc": 0.99}
    (artifact / MANIFEST_FILE).write_text(json.dumps(data))
    refused(artifact, BadSignature)


def test_weights_altered_by_one_byte(artifact: Path) -> None:
    weights = bytearray((artifact / WEIGHTS_FILE).read_bytes())
    weights[-3] ^= 0x01
    (artifact / WEIGHTS_FILE).write_bytes(bytes(weights))
    assert "sha256" in refused(artifact, ChecksumMismatch)


def test_weights_missing(artifact: Path) -> None:
    (artifact / WEIGHTS_FILE).unlink()
    assert "missing" in refused(artifact, ChecksumMismatch)


def test_truncated_weights(artifact: Path) -> None:
    data = (artifact / WEIGHTS_FILE).read_bytes()
    (artifact / WEIGHTS_FILE).write_bytes(data[: len(data) - 40])
    refused(artifact, ChecksumMismatch)
    resign(artifact)  # even with a matching sha256 and a valid signature
    refused(artifact, NotSafetensors)


def test_a_signed_pickle_is_refused_before_anything_is_unpickled(artifact: Path, tmp_path_factory) -> None:
    scratch = tmp_path_factory.mktemp("scratch")
    sanity = scratch / "sanity-unpickled"
    pickle.loads(pickle.dumps(_Marker(sanity)))
    assert sanity.exists()  # the payload is live: unpickling it leaves a trace
    marker = scratch / "unpickled"
    payload = pickle.dumps({"model.net.0.weight": _Marker(marker)}, protocol=pickle.HIGHEST_PROTOCOL)
    (artifact / WEIGHTS_FILE).write_bytes(payload)
    resign(artifact)  # matching sha256 and a valid signature: only the layout check stands
    message = refused(artifact, NotSafetensors)
    assert "not safetensors" in message
    assert not marker.exists()


def test_a_torch_save_zip_is_refused(artifact: Path) -> None:
    model, _ = baseline_model(SPEC)
    torch.save(model.state_dict(), artifact / WEIGHTS_FILE)
    assert (artifact / WEIGHTS_FILE).read_bytes()[:2] == b"PK"
    resign(artifact)
    refused(artifact, NotSafetensors)


@pytest.mark.parametrize("tamper", [
    lambda b: b[:8] + b"[" + b[9:],  # header not an object
    lambda b: b + b"\0" * 8,  # trailing bytes no tensor claims
    lambda b: (7).to_bytes(8, "little") + b[8:],  # header length inside the JSON
    lambda b: b[:8] + b[8:].replace(b'"F32"', b'"F64"', 1),  # dtype no longer matches the span
], ids=["array-header", "padded", "short-header", "dtype-span"])
def test_malformed_safetensors_layouts(artifact: Path, tamper) -> None:
    path = artifact / WEIGHTS_FILE
    path.write_bytes(tamper(path.read_bytes()))
    resign(artifact)
    refused(artifact, NotSafetensors)


def test_layout_check_accepts_what_safetensors_writes(artifact: Path) -> None:
    header = check_safetensors_layout((artifact / WEIGHTS_FILE).read_bytes())
    assert {"norm.mean", "norm.std", "norm.log1p", "model.net.0.weight"} <= set(header)


def test_other_spec_hash(artifact: Path) -> None:
    assert "spec" in refused(artifact, SpecMismatch, spec_hash="0" * 64)


def test_other_feature_names(artifact: Path) -> None:
    refused(artifact, SpecMismatch, features=NAMES[:-1] + ("secs_since_first",))
    refused(artifact, SpecMismatch, features=tuple(reversed(NAMES)))


@pytest.mark.parametrize("field", REQUIRED)
def test_manifest_missing_a_field(artifact: Path, field: str) -> None:
    resign(artifact, lambda m: m.pop(field, None), sign=field != "signature")
    assert field in refused(artifact, BadManifest)


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"version": NaN}', b"\xff\xfe"])
def test_manifest_not_a_json_object(artifact: Path, content: bytes) -> None:
    (artifact / MANIFEST_FILE).write_bytes(content)
    refused(artifact, BadManifest)


def test_manifest_missing(artifact: Path) -> None:
    (artifact / MANIFEST_FILE).unlink()
    refused(artifact, BadManifest)


def test_manifest_field_of_the_wrong_type(artifact: Path) -> None:
    resign(artifact, lambda m: m.update(features="txn_count_1m"))
    refused(artifact, BadManifest)
    resign(artifact, lambda m: m.update(kind="gbdt"))
    refused(artifact, BadManifest)


def test_signed_manifest_whose_config_does_not_fit_the_weights(artifact: Path) -> None:
    resign(artifact, lambda m: m.update(config={"hidden": [7], "dropout": 0.0}))
    verify_artifact(artifact, KEY, SPEC.spec_hash, NAMES)  # verification reads no weights
    with pytest.raises(IncompatibleWeights):
        load_artifact(artifact, KEY, SPEC.spec_hash, NAMES)


def test_save_refuses_bad_fields_and_keys(tmp_path: Path) -> None:
    model, norm = baseline_model(SPEC)
    with pytest.raises(BadManifest, match="sha256"):
        save_artifact(tmp_path, model, norm, {"version": "v", "spec_hash": "h", "sha256": "0"}, KEY)
    with pytest.raises(BadManifest, match="version"):
        save_artifact(tmp_path, model, norm, {"spec_hash": "h"}, KEY)
    with pytest.raises(ConfigError):
        save_artifact(tmp_path, model, norm, {"version": "v", "spec_hash": "h"}, b"")
    with pytest.raises(EddyError):
        save_artifact(tmp_path, build_model("mlp", 4, {}), norm, {"version": "v", "spec_hash": "h"}, KEY)
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_saving_again_replaces_the_files_whole(artifact: Path) -> None:
    before = verify_artifact(artifact, KEY, SPEC.spec_hash, NAMES)
    after = baseline_artifact(SPEC, artifact, KEY, version="v2")
    assert verify_artifact(artifact, KEY, SPEC.spec_hash, NAMES) == after and after.version != before.version
    assert sorted(p.name for p in artifact.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]
    scores = load_artifact(artifact, KEY, SPEC.spec_hash, NAMES).score(np.ones((2, len(NAMES))))
    assert scores.shape == (2,)


# ---- the model-updates message ---------------------------------------------------------------

def test_model_update_message_round_trip_and_tampering(artifact: Path) -> None:
    manifest = verify_artifact(artifact, KEY, SPEC.spec_hash, NAMES)
    message = model_update_message(manifest, f"file://{artifact}", KEY)
    assert tuple(sorted(message)) == tuple(sorted(MESSAGE_FIELDS))
    assert message["sha256"] == manifest.sha256 and message["spec_hash"] == SPEC.spec_hash
    wire = json.loads(json.dumps(message))  # through Kafka as JSON
    assert verify_message(wire, wire["signature"], KEY)
    assert not verify_message(wire, wire["signature"], OTHER)
    for name, value in (("version", "v9"), ("uri", "file:///elsewhere"), ("sha256", "0" * 64),
                        ("created_at", "2020-01-01T00:00:00Z"), ("metrics", {"pr_auc": 1.0}),
                        ("spec_hash", "f" * 64)):
        assert not verify_message({**wire, name: value}, wire["signature"], KEY), name
    assert not verify_message({**wire, "extra": 1}, wire["signature"], KEY)
    assert not verify_message(wire, None, KEY) and not verify_message(wire, "", KEY)


def test_sign_message_is_canonical() -> None:
    fields = {"version": "v1", "metrics": {"b": 1.5, "a": None}, "uri": "s3://x/ü"}
    reordered = {"uri": "s3://x/ü", "metrics": {"a": None, "b": 1.5}, "version": "v1", "signature": "ignored"}
    sig = sign_message(fields, KEY)
    assert sig == sign_message(reordered, KEY) and re.fullmatch(f"ed25519:{KEY.id}:[0-9a-f]{{128}}", sig)
    assert sig != sign_message({**fields, "version": "v2"}, KEY)
    assert verify_message(reordered, sig, KEY)
    with pytest.raises(ArtifactError):
        sign_message({"metrics": {"x": float("nan")}}, KEY)
