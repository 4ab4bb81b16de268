"""The model layer's errors: bad inputs or configs, and the artifact refusals a loader acts on."""

from __future__ import annotations

from features.errors import EddyError


class ModelError(EddyError):
    """A model could not be built or called: an unknown kind, a bad config, inputs of the wrong shape."""


class InputError(ModelError):
    """A feature row (or array) cannot be turned into model inputs; the message names the feature.

    `row` is the index of the first offending row in the batch when one row is to blame, so a
    caller can dead-letter it and score the rest."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


class ArtifactError(EddyError):
    """A model artifact was refused; the subclass says why and the message names the file."""


class BadManifest(ArtifactError):
    """manifest.json is missing, not JSON, or lacks a required field or has one of the wrong type."""


class BadSignature(ArtifactError):
    """The manifest's signature is not a trusted key's: forged, altered, or signed with a key that is not trusted."""


class ChecksumMismatch(ArtifactError):
    """model.safetensors is missing or its sha256 differs from the (signed) manifest's."""


class NotSafetensors(ArtifactError):
    """model.safetensors does not have the safetensors layout (a pickle, a zip, truncated, ...)."""


class SpecMismatch(ArtifactError):
    """The artifact was trained for another pipeline spec or another list of features."""


class IncompatibleWeights(ArtifactError):
    """The tensors in a verified artifact do not fit the model its manifest describes."""


class UpdateRefused(EddyError):
    """A model update that must not be served; the reason is one line."""
