"""Fingerprints: short hashes that tie saved work to the model and settings that made it.

Saved factors, resumable score files and checkpoints carry a fingerprint of the
model (every parameter and buffer: names, shapes, dtypes and values) and of the
settings. Loading or resuming against anything else is refused, because reused
work from another model is silently wrong.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch
from torch import Tensor, nn

_CHUNK = 1 << 24  # elements hashed per step: bounds the host copy of a large GPU tensor


def tensor_digest(hasher: "hashlib._Hash", name: str, t: Tensor) -> None:
    """Feeds a tensor's name, dtype, shape and bytes (in row-major order) to `hasher`."""
    hasher.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK].to("cpu").contiguous()
        if part.dtype == torch.bfloat16:  # NumPy has no bfloat16: hash its raw 16-bit words
            part = part.view(torch.int16)
        hasher.update(part.numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """A hex digest of the model's state: every parameter and buffer, by name, in sorted order.

    Two models get the same fingerprint exactly when their state dicts hold the same
    names, dtypes, shapes and bits; BatchNorm running statistics count.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hasher = hashlib.sha256()
    state = model.state_dict(keep_vars=False)
    for name in sorted(state):
        value = state[name]
        if isinstance(value, Tensor):
            tensor_digest(hasher, name, value)
    return hasher.hexdigest()[:32]


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """A hex digest of JSON-serialisable settings (keys sorted; dtypes and devices as strings)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
