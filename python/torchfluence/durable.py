"""What goes to disk, and how: the one atomic writer and the one digest scheme.

Saved work (factors, resumable score files, checkpoints, gradient stores, subset
retraining results) is replaced on disk by :func:`atomic_write`, so a reader sees
the old file or the new one, never a part, even after the machine crashes.

It is tied to what made it by digests: a hex SHA-256 prefix of tensors' names,
dtypes, shapes and bytes (:func:`digest`, :func:`tensor_digest`), of a model's
state (:func:`model_fingerprint`), of in-memory training data
(:func:`data_digest`) and of JSON settings (:func:`settings_fingerprint`).
Loading or resuming against anything else is refused, because reused work from
another model or other data is silently wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["atomic_write", "data_digest", "digest", "model_fingerprint", "settings_fingerprint",
           "tensor_digest"]

_CHUNK = 1 << 24  # elements hashed per step: bounds the host copy of a large GPU tensor
_HEX = 32  # hex digits kept of a SHA-256: 128 bits, no accidental collisions among saved files


# -- atomic files ---------------------------------------------------------------------------------------
def atomic_write(path: Union[str, "os.PathLike[str]"], data: Union[bytes, Callable[[Path], None]]) -> None:
    """Replaces `path` with new contents so that a reader sees the old or the new file, never a part.

    The contents go to a temporary file beside `path` (a name of its own per call, so
    concurrent writers never share one), are flushed and fsynced, and the file is
    renamed over `path` (``os.replace`` is atomic); the directory is then fsynced so
    the rename itself survives a crash of the machine. On an error the temporary
    file is removed and `path` is left as it was.

    Args:
        path: the file to write; its directory must exist.
        data: the bytes, or a function that writes the contents to the path it is
            given (to stream large tensors to disk without a copy of the file in memory,
            e.g. safetensors' ``save_file``).

    Raises:
        FileNotFoundError: if the directory of `path` does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: the directory '{path.parent}' does not exist")
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with mode 0o666 lets the umask decide the permissions, as for any new file.
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(temporary)
            fd = os.open(temporary, os.O_RDWR)
        else:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.remove(temporary)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX; elsewhere a directory cannot be opened for fsync
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# -- digests --------------------------------------------------------------------------------------------
def tensor_digest(hasher: "hashlib._Hash", name: str, t: Tensor) -> None:
    """Feeds a tensor's name, dtype, shape and bytes (in row-major order) to `hasher`."""
    hasher.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK].to("cpu").contiguous()
        if part.dtype == torch.bfloat16:  # NumPy has no bfloat16: hash its raw 16-bit words
            part = part.view(torch.int16)
        hasher.update(part.numpy().tobytes())


def digest(named: Union[Mapping[str, Tensor], Sequence[tuple[str, Tensor]]]) -> str:
    """A hex digest of tensors: names, dtypes, shapes and bits.

    Args:
        named: ``(name, tensor)`` pairs, hashed in their order; or a mapping, hashed in
            the sorted order of its keys (so insertion order does not matter).
    """
    pairs = [(key, named[key]) for key in sorted(named)] if isinstance(named, Mapping) else named
    hasher = hashlib.sha256()
    for name, tensor in pairs:
        tensor_digest(hasher, name, tensor)
    return hasher.hexdigest()[:_HEX]


def data_digest(data: Any) -> Optional[str]:
    """The digest of in-memory training data, an ``(x, y)`` pair of tensors; None for any other source.

    Other sources (DataLoaders, iterables, files) cannot be hashed without reading
    them; their sample count is checked instead.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return digest([("x", data[0]), ("y", data[1])])
    return None


def model_fingerprint(model: nn.Module) -> str:
    """A hex digest of the model's state: every parameter and buffer, by name, in sorted order.

    Two models get the same fingerprint exactly when their state dicts hold the same
    names, dtypes, shapes and bits; BatchNorm running statistics count.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = model.state_dict(keep_vars=False)
    return digest({name: value for name, value in state.items() if isinstance(value, Tensor)})


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """A hex digest of JSON-serialisable settings (keys sorted; dtypes and devices as strings)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:_HEX]
