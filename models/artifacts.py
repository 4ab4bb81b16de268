"""Model artifacts: a directory of `model.safetensors` (weights and normalisation tensors) and a
signed `manifest.json`; verification that refuses anything forged, altered or not safetensors
before a single weight is parsed; and the signed model-updates message (docs/contract.md)."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from features.errors import ConfigError
from features.validation import iso_ms
from models.errors import (
    ArtifactError,
    BadManifest,
    BadSignature,
    ChecksumMismatch,
    IncompatibleWeights,
    ModelError,
    NotSafetensors,
    SpecMismatch,
)
from models.inputs import Normaliser
from models.manifest import FORMAT, MANIFEST_FILE, MAX_MANIFEST_BYTES, MAX_WEIGHTS_BYTES, WEIGHTS_FILE, Manifest, short
from models.modules import ScorerModule, build_model
from models.scoring import LoadedModel
from models.signing import SigningKey, TrustedKeys

MAX_HEADER_BYTES = 1 << 24
# The dtypes eddy writes (and may write); anything else in a header is refused.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1}
_SETTABLE = frozenset({"version", "spec_hash", "name", "metrics", "parent", "created_at", "reference"})
# The model-update message's fields (docs/contract.md): action is publish | promote | rollback.
MESSAGE_FIELDS = ("version", "uri", "sha256", "signature", "created_at", "metrics", "spec_hash", "action",
                  "published_at", "seq")


def canonical_json(fields: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, ASCII, no NaN or infinity."""
    try:
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"cannot sign fields that are not plain JSON: {exc}") from None


def _signer(key: SigningKey) -> SigningKey:
    if not isinstance(key, SigningKey):
        raise ConfigError(f"signing needs the model's private key, got {type(key).__name__}")
    return key


def _trust(keys: TrustedKeys) -> TrustedKeys:
    if not isinstance(keys, TrustedKeys):
        raise ConfigError(f"verifying needs trusted model keys, got {type(keys).__name__}")
    return keys


def _body(fields: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in fields.items() if k != "signature"})


def sign_message(fields: Mapping[str, Any], key: SigningKey) -> str:
    """The Ed25519 signature (`ed25519:<key id>:<hex>`) over the canonical JSON of all `fields` except
    "signature"."""
    return _signer(key).sign(_body(fields))


def verify_message(fields: Mapping[str, Any], signature: str, trusted: TrustedKeys) -> bool:
    """Whether `signature` is a trusted key's over `fields` (its "signature" entry, if any, is ignored)."""
    if not isinstance(signature, str) or not isinstance(fields, Mapping):
        return False
    try:
        body = _body(fields)
    except ArtifactError:
        return False
    return _trust(trusted).verify(body, signature)


_last_sequence = 0


def next_sequence(now: float | None = None, after: int = 0) -> int:
    """A model-update sequence number: the time in microseconds, above `after` and above every one this
    process handed out before."""
    global _last_sequence
    _last_sequence = max(int((time.time() if now is None else now) * 1e6), after + 1, _last_sequence + 1)
    return _last_sequence


def model_update_message(manifest: Manifest, uri: str, key: SigningKey, action: str = "publish",
                         published_at: float | None = None, extra: Mapping[str, Any] | None = None,
                         seq: int | None = None) -> dict[str, Any]:
    """The signed model-updates record announcing `manifest`'s artifact at `uri`. `action` is publish
    (serve if newer than what serves), promote or rollback (serve this version, explicitly), or rollout
    and rollout_end (models.rollout, whose state goes in `extra`, signed with the rest). `seq` is the
    message's place in the topic's order (models.updates.publish_messages sets it; by default the
    time in microseconds): scorers ignore one that is not above the last they took, so a message
    replayed onto the topic changes nothing."""
    published_at = time.time() if published_at is None else published_at
    fields = {"version": manifest.version, "uri": uri, "sha256": manifest.sha256,
              "created_at": manifest.created_at, "metrics": manifest.metrics,
              "spec_hash": manifest.spec_hash, "action": action, "published_at": published_at,
              "seq": next_sequence(published_at) if seq is None else seq, **(extra or {})}
    return {**fields, "signature": sign_message(fields, key)}


def save_artifact(directory: str | os.PathLike, model: ScorerModule, normaliser: Normaliser,
                  manifest_fields: Mapping[str, Any], key: SigningKey) -> Manifest:
    """Write model.safetensors and the signed manifest.json into `directory` (created if absent).

    `manifest_fields` gives version and spec_hash (required) and optionally name, metrics,
    parent, created_at (default: now, UTC) and reference (models.drift.reference(): the training
    distribution drift is measured against); the rest is derived from the model and the
    normaliser. Each file is written to a temporary name and renamed, weights first."""
    key = _signer(key)
    unknown = sorted(set(manifest_fields) - _SETTABLE)
    if unknown:
        raise BadManifest(f"manifest field(s) {', '.join(unknown)} cannot be set; "
                          f"settable: {', '.join(sorted(_SETTABLE))}")
    if getattr(model, "n_inputs", None) != normaliser.n_inputs:
        raise ModelError(f"the model reads {getattr(model, 'n_inputs', '?')} inputs but the "
                         f"normaliser makes {normaliser.n_inputs}")
    version = manifest_fields.get("version")
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tensors.update(normaliser.to_tensors())
    data = save_safetensors_bytes(tensors, metadata={"format": "pt", "eddy.version": str(version)})
    layout = normaliser.layout()
    if model.kind == "sequence":
        layout = {**layout, "sequence_length": model.config["seq_len"], "padding": "right"}
    fields = {
        "format": FORMAT, "version": version, "name": manifest_fields.get("name", ""),
        "kind": model.kind, "config": dict(model.config), "spec_hash": manifest_fields.get("spec_hash"),
        "features": list(normaliser.names), "input_layout": layout,
        "normalisation": normaliser.summary(), "metrics": dict(manifest_fields.get("metrics") or {}),
        "created_at": manifest_fields.get("created_at") or iso_ms(int(time.time() * 1000)),
        "parent": manifest_fields.get("parent"), "sha256": hashlib.sha256(data).hexdigest(),
    }
    if manifest_fields.get("reference") is not None:
        fields["reference"] = manifest_fields["reference"]
    fields["signature"] = sign_message(fields, key)
    manifest = Manifest.from_dict(fields, "the new manifest")  # refuses a missing version or spec hash
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / WEIGHTS_FILE, data)
    _write_atomic(root / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2, sort_keys=True,
                                                   allow_nan=False).encode() + b"\n")
    return manifest


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify_artifact(directory: str | os.PathLike, key: TrustedKeys, expected_spec_hash: str | None,
                    expected_features: Sequence[str] | None) -> Manifest:
    """The artifact's manifest, after checking (in this order, each refusal its own error):
    manifest JSON and fields (BadManifest), signature (BadSignature), sha256 of the weights
    (ChecksumMismatch), safetensors layout (NotSafetensors), spec hash and feature names
    (SpecMismatch; None skips that check). Only bytes and JSON are read, never weights."""
    return _verified(Path(directory), key, expected_spec_hash, expected_features)[0]


def load_artifact(directory: str | os.PathLike, key: TrustedKeys, expected_spec_hash: str | None,
                  expected_features: Sequence[str] | None,
                  device: torch.device | str = "cpu") -> LoadedModel:
    """Verify (see verify_artifact), then build the model from the very bytes that were
    verified, with safetensors only (never pickle), on `device`."""
    manifest, data = _verified(Path(directory), key, expected_spec_hash, expected_features)
    where = os.fspath(Path(directory) / WEIGHTS_FILE)
    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as exc:
        raise NotSafetensors(f"{where}: safetensors refused it: {exc}") from None
    stray = sorted(k for k in tensors if not k.startswith(("model.", "norm.")))
    if stray:
        raise IncompatibleWeights(f"{where}: unexpected tensor(s) {', '.join(stray[:5])}")
    try:
        normaliser = Normaliser.from_tensors(manifest.features, tensors)
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's RNG
            model = build_model(manifest.kind, normaliser.n_inputs, manifest.config)
        state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
    except (ModelError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IncompatibleWeights(f"{where}: the tensors do not fit the {manifest.kind} model of "
                                  f"the manifest: {reason}") from None
    return LoadedModel(model, normaliser, manifest, device)


def _verified(root: Path, key: TrustedKeys, expected_spec_hash: str | None,
              expected_features: Sequence[str] | None) -> tuple[Manifest, bytes]:
    key = _trust(key)
    where = os.fspath(root / MANIFEST_FILE)
    raw = _read(root / MANIFEST_FILE, MAX_MANIFEST_BYTES, BadManifest)
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadManifest(f"{where}: not valid JSON: {str(exc).splitlines()[0]}") from None
    manifest = Manifest.from_dict(data, where)
    if not verify_message(data, manifest.signature, key):
        raise BadSignature(f"{where}: the signature is not a trusted model key's "
                           "(forged, altered, or signed with a key that is not trusted)")
    weights_path = root / WEIGHTS_FILE
    weights = _read(weights_path, MAX_WEIGHTS_BYTES, ChecksumMismatch)
    if not hmac.compare_digest(hashlib.sha256(weights).hexdigest(), manifest.sha256):
        raise ChecksumMismatch(f"{weights_path}: sha256 differs from the signed manifest's "
                               "(altered or partly written weights)")
    check_safetensors_layout(weights, os.fspath(weights_path))
    if expected_spec_hash is not None and manifest.spec_hash != expected_spec_hash:
        raise SpecMismatch(f"{where}: trained for spec {manifest.spec_hash[:12]}, this pipeline's "
                           f"spec is {expected_spec_hash[:12]}; retrain for this spec")
    if expected_features is not None and tuple(expected_features) != manifest.features:
        raise SpecMismatch(f"{where}: features {list(manifest.features)} differ from the "
                           f"pipeline's {list(expected_features)}; retrain for this spec")
    return manifest, weights


def _read(path: Path, limit: int, error: type[ArtifactError]) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{path}: larger than {limit} bytes")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_safetensors_layout(data: bytes, where: str = WEIGHTS_FILE) -> dict[str, Any]:
    """The header of safetensors bytes after checking the layout without touching the tensor
    data: 8-byte little-endian header length, a JSON object header, known dtypes, shapes
    that match their byte spans, spans that tile the data exactly. NotSafetensors otherwise
    (a pickle, a zip from torch.save, a truncated or padded file)."""
    size = len(data)
    if size < 8:
        raise NotSafetensors(f"{where}: {size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
        raise NotSafetensors(f"{where}: header length {n} does not fit a {size}-byte file; not "
                             f"safetensors (starts {data[:4]!r}: a pickle, zip or truncated file?)")
    if data[8:9] != b"{":
        raise NotSafetensors(f"{where}: the header is not a JSON object")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotSafetensors(f"{where}: the header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise NotSafetensors(f"{where}: the header is not a JSON object")
    body = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise NotSafetensors(f"{where}: __metadata__ must map strings to strings")
            continue
        spans.append(_tensor_span(name, entry, body, where))
    spans.sort()
    end = 0
    for start, stop in spans:
        if start != end:
            raise NotSafetensors(f"{where}: tensor data overlaps or leaves a gap at byte {end}")
        end = stop
    if end != body:
        raise NotSafetensors(f"{where}: tensors cover {end} bytes but the data is {body} bytes (truncated?)")
    return header


def _tensor_span(name: str, entry: Any, body: int, where: str) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise NotSafetensors(f"{where}: tensor {name!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_BYTES:
        raise NotSafetensors(f"{where}: tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(_DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise NotSafetensors(f"{where}: tensor {name!r} has an invalid shape {short(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body):
        raise NotSafetensors(f"{where}: tensor {name!r} has data offsets {short(offsets)} outside the data")
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise NotSafetensors(f"{where}: tensor {name!r} of shape {shape} does not match its byte span")
    return offsets[0], offsets[1]
