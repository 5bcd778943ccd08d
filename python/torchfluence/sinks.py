"""Sinks: where blocks of scores go.

Every scoring path produces blocks whose last (or ``sample_dim``) dimension
indexes training samples, and writes each block to one or more sinks:

- :class:`DenseSink`: a tensor in memory (the influence matrix, self-influences,
  per-layer scores, perturbation scores);
- :class:`MemmapSink`: the same, memory-mapped in a ``.npy`` file, so the result
  may be larger than memory;
- :class:`TopKSink`: streaming top-k of the largest (helpful) and smallest
  (harmful) scores per query, through the compiled ``topk_merge`` op.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from .distributed import all_reduce_count, all_reduce_max, all_reduce_sum, is_distributed, merge_topk
from .topk import StreamingTopK, TopKResult

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class ScoreSink(ABC):
    """Receives blocks of values for consecutive samples."""

    @abstractmethod
    def write(self, block: Tensor, offset: int) -> None:
        """Stores `block` for samples ``offset .. offset + block.shape[sample_dim]``."""

    @abstractmethod
    def result(self):
        """What was collected."""

    def gather(self) -> None:  # noqa: B027 - nothing to combine by default
        """Combines what each process collected (distributed jobs); called once, after the last block."""


class DenseSink(ScoreSink):
    """Collects blocks into one tensor.

    Args:
        shape: the full result's shape; ``shape[sample_dim]`` is the number of samples.
        sample_dim: the dimension that indexes samples.
        dtype, device: of the result.
    """

    def __init__(self, shape: tuple[int, ...], *, dtype: torch.dtype, device: Union[str, torch.device],
                 sample_dim: int = -1) -> None:
        # Distributed: each process fills its own columns, the others stay exact zeros for the sum.
        self.out = (torch.zeros if is_distributed() else torch.empty)(shape, dtype=dtype, device=device)
        self.sample_dim = sample_dim % len(shape)
        self.filled = 0

    def write(self, block: Tensor, offset: int) -> None:
        self.out.narrow(self.sample_dim, offset, block.shape[self.sample_dim]).copy_(block)
        self.filled += block.shape[self.sample_dim]

    def gather(self) -> None:
        all_reduce_sum(self.out)
        self.filled = all_reduce_count(self.filled, self.out.device)

    def result(self) -> Tensor:
        expected = self.out.shape[self.sample_dim]
        if self.filled != expected:
            raise ValueError(f"the data yielded {self.filled} samples, but {expected} were expected")
        return self.out


class MemmapSink(DenseSink):
    """Like :class:`DenseSink`, backed by a ``.npy`` file that is written block by block.

    Only the blocks being written sit in memory; the returned tensor shares the
    file's pages (``torch.from_numpy`` of a NumPy memmap).
    """

    def __init__(self, path: Union[str, Path], shape: tuple[int, ...], *, dtype: torch.dtype,
                 sample_dim: int = -1) -> None:
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"MemmapSink: dtype must be one of {list(_NUMPY_DTYPES)}, got {dtype}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=_NUMPY_DTYPES[dtype], shape=shape)
        self.out = torch.from_numpy(self.array)
        self.sample_dim = sample_dim % len(shape)
        self.filled = 0

    def write(self, block: Tensor, offset: int) -> None:
        super().write(block.to("cpu"), offset)

    def result(self) -> Tensor:
        out = super().result()
        self.array.flush()
        return out


class TopKSink(ScoreSink):
    """Streaming top-k of (n_query, b) score blocks."""

    def __init__(self, n_query: int, k: int, *, dtype: torch.dtype, device: Union[str, torch.device]) -> None:
        self.state = StreamingTopK(n_query, k, device=device, dtype=dtype)

    def write(self, block: Tensor, offset: int) -> None:
        self.state.update_scores(block, offset)

    def gather(self) -> None:
        state = self.state
        if not is_distributed():
            return
        all_reduce_sum(state.status)
        state.largest_values, state.largest_indices = merge_topk(state.largest_values, state.largest_indices,
                                                                 largest=True)
        state.smallest_values, state.smallest_indices = merge_topk(state.smallest_values, state.smallest_indices,
                                                                   largest=False)
        state.n_seen = all_reduce_max(state.n_seen, state.device)

    def result(self) -> TopKResult:
        return self.state.result()
