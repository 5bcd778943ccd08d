"""Argument checks shared by the engine, and the one policy for NaN and inf.

Every error names the argument, what was expected and what was given. A
non-finite value is never ranked or returned silently: it is reported with
the global sample index it belongs to, through :func:`check_finite` (on a
tensor in hand) or :func:`nonfinite_error` (from a kernel's counter).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def nonfinite_error(what: str, count: int, row: Optional[int], index: Optional[int],
                    hint: str = "check the inputs and the model for NaN/inf or overflow") -> ValueError:
    """The error for `count` non-finite values of `what`; `row` is a query row, `index` a global sample index."""
    where = []
    if row is not None and row >= 0:
        where.append(f"query row {row}")
    if index is not None and index >= 0:
        where.append(f"sample {index}")
    at = f" (first at {', '.join(where)})" if where else ""
    return ValueError(f"{what}: {count} value(s) are NaN or inf{at}; {hint}")


def check_finite(tensor: Tensor, what: str, offset: int = 0, *, sample_dim: int = 0) -> None:
    """Raises :func:`nonfinite_error` if `tensor` holds NaN or inf.

    Args:
        tensor: any shape; dimension `sample_dim` indexes samples whose global
            index is ``offset + position``. For a (n_query, b) score block use
            ``sample_dim=1``: the error then also names the query row.
        what: what the tensor is, for the message ("inputs", "influence scores").
        offset: global index of the tensor's first sample.
    """
    if not tensor.is_floating_point() and not tensor.is_complex():
        return
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return
    if tensor.dim() == 0:
        raise nonfinite_error(what, 1, None, None)
    raise nonfinite_error(what, int(bad.sum()), *_position(bad.nonzero()[0].tolist(), sample_dim, offset))


def _position(first: list[int], sample_dim: int, offset: int) -> tuple[Optional[int], Optional[int]]:
    """(query row, global sample index) of the element at coordinates `first`, for the error message."""
    sample_dim %= len(first)
    row = first[0] if len(first) == 2 and sample_dim == 1 else None
    index = offset + first[sample_dim] if offset >= 0 else None
    return row, index


class FiniteChecks:
    """:func:`check_finite` over a stream of blocks, without a host sync per block on a GPU.

    On the CPU each block is checked at once. On a GPU each block leaves two
    device scalars (its count of non-finite values and the flat position of the
    first), and the host reads them every `every` blocks and at :meth:`finish`:
    one synchronisation per `every` blocks instead of one per block. The error
    names the same sample and query row as :func:`check_finite`.
    """

    def __init__(self, what: str, *, sample_dim: int = 0, every: int = 16, defer: Optional[bool] = None) -> None:
        self.what, self.sample_dim, self.every, self.defer = what, sample_dim, every, defer
        self._pending: list[tuple[int, torch.Size, Tensor]] = []

    def add(self, tensor: Tensor, offset: int) -> None:
        """Checks (or queues the check of) `tensor`, whose first sample has global index `offset`."""
        defer = tensor.is_cuda if self.defer is None else self.defer
        if not defer or tensor.dim() == 0 or not tensor.is_floating_point():
            check_finite(tensor, self.what, offset, sample_dim=self.sample_dim)
            return
        bad = ~torch.isfinite(tensor).flatten()
        summary = torch.stack([bad.sum(), bad.to(torch.uint8).argmax()])  # argmax: the first maximum
        self._pending.append((offset, tensor.shape, summary))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        summaries = torch.stack([s for _, _, s in pending]).tolist()  # the one synchronisation
        for (offset, shape, _), (count, flat) in zip(pending, summaries):
            if count:
                first = []
                for size in reversed(shape):
                    first.append(flat % size)
                    flat //= size
                first.reverse()
                raise nonfinite_error(self.what, count, *_position(first, self.sample_dim, offset))

    def finish(self) -> None:
        """Reads whatever is still queued; raises for the first non-finite value."""
        self.flush()


def check_regularization(value: float, name: str = "regularization", positive: bool = False) -> float:
    """A finite float >= 0 (> 0 with `positive`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0 here, got {value!r}")
    return float(value)


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_choice(value, name: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_mode(mode: str) -> None:
    """Raises UnsupportedInfluenceModeException (a ValueError) unless `mode` is "up" or "perturbation"."""
    if not isinstance(mode, str) or mode not in ("up", "perturbation"):
        from .exceptions import UnsupportedInfluenceModeException
        raise UnsupportedInfluenceModeException(mode)
