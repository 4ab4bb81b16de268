"""Batch scoring with a loaded model: feature rows in, float32 scores in [0, 1] out, one model
call per batch; and the choice of device from the EDDY_DEVICE setting."""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from features.errors import ConfigError
from models.errors import InputError
from models.inputs import Normaliser, histories_to_array
from models.manifest import Manifest
from models.modules import ScorerModule

DEVICE_SETTINGS = ("auto", "cpu", "cuda")


class Versioned(Protocol):
    """What scoring reads of a model's manifest: its version. A Manifest, or a stand-in naming a
    version for a model that was never saved (a benchmark's, a test's)."""

    @property
    def version(self) -> str: ...


def pick_device(setting: str) -> torch.device:
    """The torch device for EDDY_DEVICE: "auto" (CUDA when available, else CPU), "cpu", "cuda"
    (ConfigError when no CUDA device is usable), or an explicit "cuda:N"."""
    value = (setting or "").strip().lower()
    if value == "cpu":
        return torch.device("cpu")
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cuda" or value.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"EDDY_DEVICE={setting} but no CUDA device is available to torch "
                              f"{torch.__version__}; use EDDY_DEVICE=auto or cpu")
        device = torch.device(value)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"EDDY_DEVICE={setting} but only {torch.cuda.device_count()} CUDA "
                              "device(s) exist; use cuda or cuda:0")
        return device
    raise ConfigError(f"EDDY_DEVICE={setting!r} is not one of {', '.join(DEVICE_SETTINGS)}")


class LoadedModel:
    """A model in eval mode on its device, with the normaliser and manifest it was saved with.

    Each score call makes one model call for the whole batch. Calls may come from several
    threads; on CUDA they are serialised around the pinned staging buffer."""

    def __init__(self, model: ScorerModule, normaliser: Normaliser, manifest: Manifest | Versioned | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.normaliser = normaliser
        self.manifest = manifest
        self._lock = threading.Lock()
        self._pinned: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def version(self) -> str | None:
        return None if self.manifest is None else self.manifest.version

    @property
    def seq_len(self) -> int:
        """How many rows of an entity's history the model reads (1 for mlp)."""
        return self.model.config.get("seq_len", 1) if self.kind == "sequence" else 1

    def score(self, batch_rows: Sequence[Mapping[str, Any]] | np.ndarray) -> np.ndarray:
        """float32 [B] scores of feature rows (or feature dicts, or raw values [B, F] with NaN
        for null). A sequence model scores each row as a history of length 1."""
        if isinstance(batch_rows, np.ndarray):
            inputs = self.normaliser.transform(_raw(batch_rows, 2, self.normaliser.n_features))
        else:
            inputs = self.normaliser.rows_to_inputs(batch_rows)
        return self.score_inputs(inputs)

    def score_sequences(self, histories: Sequence[Sequence[Mapping[str, Any]]] | np.ndarray,
                        lengths: np.ndarray | None = None) -> np.ndarray:
        """float32 [B] scores of each entity's history (rows oldest first, the scored event
        last), or of raw values [B, N, F] right-padded with `lengths` [B]. An mlp scores the
        last row of each history."""
        if isinstance(histories, np.ndarray):
            values = _raw(histories, 3, self.normaliser.n_features)
            if lengths is None:
                lengths = np.full(values.shape[0], values.shape[1], dtype=np.int64)
        else:
            values, lengths = histories_to_array(histories, self.normaliser.names, self.seq_len)
        return self.score_inputs(self.normaliser.transform(values), lengths)

    def score_inputs(self, inputs: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """float32 [B] scores of prepared inputs [B, 2F] or [B, N, 2F] (see Normaliser.transform)."""
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        if inputs.ndim not in (2, 3) or inputs.shape[-1] != self.normaliser.n_inputs:
            raise InputError(f"expected inputs [B, {self.normaliser.n_inputs}] or "
                             f"[B, N, {self.normaliser.n_inputs}], got shape {inputs.shape}")
        if inputs.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        lens = None
        if lengths is not None:
            lens = np.asarray(lengths, dtype=np.int64)
            if lens.shape != inputs.shape[:1] or inputs.ndim != 3 or lens.min() < 1 or lens.max() > inputs.shape[1]:
                raise InputError(f"lengths must be [B] integers in 1..N for inputs {inputs.shape}")
        if self.device.type != "cuda":
            with torch.inference_mode():
                return self._call(torch.from_numpy(inputs), lens)
        with self._lock, torch.inference_mode():
            return self._call(self._to_device(inputs), lens)

    def _call(self, x: torch.Tensor, lengths: np.ndarray | None) -> np.ndarray:
        lens = None if lengths is None else torch.from_numpy(lengths).to(self.device, non_blocking=True)
        logits = self.model(x, lens)
        return torch.sigmoid(logits).float().cpu().numpy()  # .cpu() waits for the stream

    def _to_device(self, inputs: np.ndarray) -> torch.Tensor:
        # One pinned buffer, grown on demand: page-locked memory makes the copy asynchronous
        # and avoids a staging copy; reuse is safe because _call waits for the result.
        n = inputs.size
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 1 << 16), dtype=torch.float32, pin_memory=True)
        staged = self._pinned[:n].view(inputs.shape)
        staged.numpy()[...] = inputs
        return staged.to(self.device, non_blocking=True)

    def warm_up(self, batch_sizes: Sequence[int] = (1, 64, 1024)) -> None:
        """Run each batch size once (allocator, kernels, cuDNN plans) so the first real batch
        is not the slow one."""
        f = self.normaliser.n_inputs
        for b in batch_sizes:
            if self.kind == "sequence":
                self.score_inputs(np.zeros((b, self.seq_len, f), np.float32),
                                  np.full(b, self.seq_len, dtype=np.int64))
            self.score_inputs(np.zeros((b, f), np.float32))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def to(self, device: torch.device | str) -> LoadedModel:
        """The same model on another device: a new LoadedModel with its own copy of the weights."""
        return LoadedModel(copy.deepcopy(self.model), self.normaliser, self.manifest, device)


def _raw(values: np.ndarray, ndim: int, f: int) -> np.ndarray:
    if values.ndim != ndim or values.shape[-1] != f:
        shape = "[B, F]" if ndim == 2 else "[B, N, F]"
        raise InputError(f"expected raw feature values {shape} with F={f}, got shape {values.shape}")
    return values
