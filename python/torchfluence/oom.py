"""Out-of-memory splitting: a block that does not fit on the GPU is scored in halves.

The block size bounds memory at about ``block_size x num_params`` values, but
what fits depends on the GPU, the model and what else holds memory. When
scoring a block raises ``torch.cuda.OutOfMemoryError``, the block is scored in
two halves (each halved again while it still does not fit), with a warning
naming the new size; later blocks are scored at that size from the start.
Below one sample the error propagates. The block's scores are concatenated,
so sinks and resumable records see whole blocks as before. Splitting changes
only which samples share a matrix product, so scores agree with unsplit ones
to rounding (the summation order inside a product may change with its width).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .data import SampleBlock

Score = Callable[[SampleBlock], Tensor]


class SplitOnOOM:
    """Calls ``score(block)``, in smaller pieces after a CUDA out-of-memory error.

    Args:
        score: ``block -> values`` whose dimension `sample_dim` indexes the block's samples.
        sample_dim: the dimension of the values that indexes samples (they are concatenated along it).
        chunk: the most samples to score at once from the start (None: whole blocks), e.g. the
            size an earlier run of the same job had reduced to.

    Attributes:
        chunk: the most samples scored at once now (None until the first split).
    """

    def __init__(self, score: Score, sample_dim: int = -1, chunk: Optional[int] = None) -> None:
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be None or a positive int, got {chunk!r}")
        self.score, self.sample_dim, self.chunk = score, sample_dim, chunk

    def __call__(self, block: SampleBlock) -> Tensor:
        """The values of `block`, (..., block.size, ...) along `sample_dim`."""
        parts: list[Tensor] = []
        start = 0
        size = block.size if self.chunk is None else min(self.chunk, block.size)
        while start < block.size:
            stop = min(start + size, block.size)
            piece = (block if stop - start == block.size
                     else SampleBlock(block.x[start:stop], block.y[start:stop], block.offset + start))
            failed = False
            try:
                parts.append(self.score(piece))
            except torch.cuda.OutOfMemoryError:
                if stop - start <= 1:
                    raise  # one sample does not fit: nothing left to split
                failed = True  # retried below, once the handler has dropped the failed attempt's tensors
            if not failed:
                start = stop
                continue
            size = (stop - start + 1) // 2
            self.chunk = size
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # hand the failed attempt's cached blocks back before retrying
            warnings.warn(f"CUDA out of memory while scoring {stop - start} samples (from sample "
                          f"{block.offset + start}); scoring at most {size} samples at a time from now on",
                          RuntimeWarning, stacklevel=2)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.sample_dim)
