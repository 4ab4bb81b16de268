"""Who may sign models: Ed25519 keys. The publisher (retrainer, `eddy promote`, the rollout judge) holds
the private key; scorers hold only trusted public keys, so a scorer host that is taken over cannot sign
a model for the others. A signature names its key (`ed25519:<key id>:<hex>`), so keys rotate: a new key
is trusted beside the old one until the old one is retired.

A private key is written as its 32-byte seed in 64 hex characters (what `openssl rand -hex 32` makes);
a public key as its 32 bytes in 64 hex characters; a key id is the first 16 hex characters of the
sha256 of the public key."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from features.errors import ConfigError

SCHEME = "ed25519"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


class TrustedKeys:
    """The public keys whose signatures are accepted, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self.keys = {key_id(k): k for k in keys}
        if not self.keys:
            raise ConfigError("no trusted model key: set EDDY_MODEL_TRUST to the publisher's public key "
                              "(`eddy model-key` prints it)")

    @classmethod
    def parse(cls, text: str, where: str = "EDDY_MODEL_TRUST") -> TrustedKeys:
        """Public keys of 64 hex characters, separated by commas, spaces or newlines."""
        entries = [e for e in re.split(r"[,\s]+", text.strip()) if e]
        bad = [e[:12] for e in entries if not _HEX64.match(e)]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r}... is not a public key of 64 hex characters "
                              "(`eddy model-key` prints the publisher's)")
        return cls(Ed25519PublicKey.from_public_bytes(bytes.fromhex(e)) for e in entries)

    def verify(self, data: bytes, signature: object) -> bool:
        """Whether `signature` is a trusted key's over `data`."""
        if not isinstance(signature, str):
            return False
        scheme, _, rest = signature.partition(":")
        kid, _, hexsig = rest.partition(":")
        public = self.keys.get(kid)
        if scheme != SCHEME or public is None or len(hexsig) != 128:
            return False
        try:
            public.verify(bytes.fromhex(hexsig), data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def public_hex(self) -> list[str]:
        return [_raw(k).hex() for k in self.keys.values()]


class SigningKey(TrustedKeys):
    """A private key: signs, and trusts its own public key (plus any `also` trusted, for rotation)."""

    def __init__(self, private: Ed25519PrivateKey, also: Iterable[Ed25519PublicKey] = ()) -> None:
        self._private = private
        self.id = key_id(private.public_key())
        super().__init__([private.public_key(), *also])

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_hex(cls, text: str, where: str = "EDDY_MODEL_KEY") -> SigningKey:
        text = text.strip()
        if not _HEX64.match(text):
            raise ConfigError(f"{where}: the model key must be 64 hex characters (an Ed25519 seed of 32 bytes; "
                              "make one with `openssl rand -hex 32`)")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text)))

    def sign(self, data: bytes) -> str:
        return f"{SCHEME}:{self.id}:{self._private.sign(data).hex()}"

    def public(self) -> TrustedKeys:
        """Only this key's public half: what a process that must not sign is given."""
        return TrustedKeys([self._private.public_key()])

    def __repr__(self) -> str:
        return f"SigningKey(id={self.id})"
