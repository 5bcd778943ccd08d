"""Iterating user data: DataLoaders, (x, y) tuples of tensors, with clear errors."""

from __future__ import annotations

from typing import Iterable, Iterator, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader

Batches = Union[DataLoader, Iterable[tuple[Tensor, Tensor]]]


def check_pair(x: Tensor, y: Tensor, what: str = "x, y") -> None:
    for name, t in zip(what.split(", "), (x, y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")


def iterate_batches(data: Batches, name: str = "data") -> Iterator[tuple[Tensor, Tensor]]:
    """Yields (x, y) batches from a DataLoader or any iterable of pairs; rejects empty input."""
    seen = False
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"{name} must yield (inputs, targets) pairs, got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        check_pair(x, y, f"{name} inputs, {name} targets")
        if x.shape[0] == 0:
            continue
        seen = True
        yield x, y
    if not seen:
        raise ValueError(f"{name} is empty: it yielded no samples")


def count_samples(data: Batches, name: str = "data") -> int:
    if isinstance(data, DataLoader) and hasattr(data.dataset, "__len__") and not data.drop_last:
        n = len(data.dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError(f"{name} is empty: it yielded no samples")
        return n
    return sum(x.shape[0] for x, _ in iterate_batches(data, name))


def chunks(x: Tensor, y: Tensor, size: int) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(start, x_chunk, y_chunk) over rows, `size` at a time."""
    for start in range(0, x.shape[0], size):
        yield start, x[start:start + size], y[start:start + size]


def collect(data: Batches, name: str = "data") -> tuple[Tensor, Tensor]:
    xs, ys = zip(*iterate_batches(data, name))
    return torch.cat(xs), torch.cat(ys)
