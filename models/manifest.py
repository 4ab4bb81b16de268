"""The manifest of a model artifact (manifest.json): what it holds and the check of every field."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from features.spec import MODEL_KINDS as KINDS
from models.errors import BadManifest

FORMAT = "eddy-model/1"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
MAX_MANIFEST_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 1 << 31
_SIGNATURE = re.compile(r"^ed25519:[0-9a-f]{16}:[0-9a-f]{128}$")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class Manifest:
    """What manifest.json holds. `signature` is the publisher's Ed25519 signature (models.signing:
    `ed25519:<key id>:<hex>`) over the canonical JSON of every other field, `sha256` included, so the
    signature also covers the weights."""

    version: str
    kind: str
    config: dict[str, Any]
    spec_hash: str
    features: tuple[str, ...]
    input_layout: dict[str, Any]
    normalisation: dict[str, Any]
    metrics: dict[str, Any]
    created_at: str
    parent: str | None
    sha256: str
    signature: str
    name: str = ""
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def reference(self) -> dict[str, Any] | None:
        """The training distribution drift is measured against (models.drift), when recorded."""
        ref = self.extra.get("reference")
        return ref if isinstance(ref, dict) and isinstance(ref.get("features"), dict) else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data["features"] = list(self.features)
        return {**extra, **data}

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Check every required field and its type; BadManifest names the first bad one."""
        if not isinstance(data, dict):
            raise BadManifest(f"{where}: expected a JSON object, got {type(data).__name__}")
        for name, (types, check) in _SCHEMA.items():
            if name not in data:
                raise BadManifest(f"{where}: required field {name!r} is missing")
            value = data[name]
            if not isinstance(value, types) or isinstance(value, bool) or not check(value):
                raise BadManifest(f"{where}: field {name!r} has an invalid value {short(value)}")
        known = {k: data[k] for k in _SCHEMA}
        known["features"] = tuple(known["features"])
        return cls(**known, extra={k: v for k, v in data.items() if k not in _SCHEMA})


def _is_str_list(value: list) -> bool:
    return bool(value) and all(isinstance(v, str) and v for v in value) and len(set(value)) == len(value)


_SCHEMA: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "format": (str, lambda v: v == FORMAT),
    "version": (str, bool),
    "name": (str, lambda v: True),
    "kind": (str, lambda v: v in KINDS),
    "config": (dict, lambda v: True),
    "spec_hash": (str, bool),
    "features": (list, _is_str_list),
    "input_layout": (dict, lambda v: True),
    "normalisation": (dict, lambda v: True),
    "metrics": (dict, lambda v: True),
    "created_at": (str, bool),
    "parent": ((str, type(None)), lambda v: True),
    "sha256": (str, lambda v: bool(_HEX64.match(v))),
    "signature": (str, lambda v: bool(_SIGNATURE.match(v))),
}


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


