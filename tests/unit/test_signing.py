"""Ed25519 model signatures (models.signing): a signature names its key; trusted public keys verify
it, others and any change refuse it; a rotation trusts the old and the new key together; a process
given only the public half cannot sign; keys are checked when they are read."""

from __future__ import annotations

import pytest

from features.errors import ConfigError
from models.artifacts import sign_message, verify_message
from models.signing import SigningKey, TrustedKeys

OLD, NEW, STRANGER = (SigningKey.from_hex(h * 32) for h in ("01", "02", "03"))
FIELDS = {"version": "v7", "action": "rollback", "seq": 1_700_000_000_000_001, "metrics": {"pr_auc": 0.8}}


def test_a_signature_names_its_key_and_verifies_only_under_a_trusted_one():
    signature = sign_message(FIELDS, OLD)
    scheme, kid, hexsig = signature.split(":")
    assert (scheme, kid, len(hexsig)) == ("ed25519", OLD.id, 128)
    assert verify_message(FIELDS, signature, OLD.public())
    assert not verify_message(FIELDS, signature, NEW.public())
    assert not verify_message({**FIELDS, "seq": FIELDS["seq"] + 1}, signature, OLD.public())
    assert not verify_message(FIELDS, sign_message(FIELDS, STRANGER), OLD.public())
    # a stranger's signature relabelled with a trusted key id is still refused
    forged = f"ed25519:{OLD.id}:{sign_message(FIELDS, STRANGER).split(':')[2]}"
    assert not verify_message(FIELDS, forged, OLD.public())
    for bad in ("", "ed25519", f"ed25519:{OLD.id}:zz", f"hmac:{OLD.id}:{hexsig}", None, 7):
        assert not verify_message(FIELDS, bad, OLD.public())  # type: ignore[arg-type]


def test_a_rotation_trusts_both_keys_until_the_old_one_is_retired():
    both = TrustedKeys.parse(f"{OLD.public_hex()[0]}, {NEW.public_hex()[0]}")
    assert verify_message(FIELDS, sign_message(FIELDS, OLD), both)
    assert verify_message(FIELDS, sign_message(FIELDS, NEW), both)
    retired = TrustedKeys.parse(NEW.public_hex()[0])
    assert not verify_message(FIELDS, sign_message(FIELDS, OLD), retired)


def test_the_public_half_cannot_sign():
    public = OLD.public()
    assert not isinstance(public, SigningKey) and not hasattr(public, "sign")
    with pytest.raises(ConfigError, match="private key"):
        sign_message(FIELDS, public)  # type: ignore[arg-type]
    assert "01" * 4 not in repr(OLD)  # the seed never shows


@pytest.mark.parametrize("text", ["", "abc", "0" * 63, "g" * 64, "0" * 64 + ",xyz"])
def test_malformed_keys_are_one_line_errors(text: str):
    with pytest.raises(ConfigError):
        TrustedKeys.parse(text)
    if "," not in text:
        with pytest.raises(ConfigError, match="64 hex characters"):
            SigningKey.from_hex(text)
