"""Sinks: where blocks of scores go.

Every scoring path produces blocks whose last (or ``sample_dim``) dimension
indexes training samples, and writes each block to one or more sinks:

- :class:`DenseSink`: a tensor in memory (the influence matrix, self-influences,
  per-layer scores, perturbation scores);
- :class:`MemmapSink`: the same, memory-mapped in a ``.npy`` file, so the result
  may be larger than memory;
- :class:`TopKSink`: streaming top-k of the largest (helpful) and smallest
  (harmful) scores per query, through the compiled ``topk_merge`` op;
- :class:`RowsSink`: some rows of each block to another sink, when one pass
  scores several results (the scores, then the training samples' self-influences).
"""

from __future__ import annotations

import math
import mmap
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .distributed import (all_reduce_count, all_reduce_max, all_reduce_sum, barrier, is_distributed, is_main_process,
                          merge_topk)
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
        out: optional tensor of `shape` and `dtype` to fill (default: a new one).
    """

    def __init__(self, shape: tuple[int, ...], *, dtype: torch.dtype, device: Union[str, torch.device],
                 sample_dim: int = -1, out: Optional[Tensor] = None) -> None:
        if out is not None:  # the caller's tensor, filled in place
            if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
                name = str(dtype).removeprefix("torch.")
                raise ValueError(f"out must be a {tuple(shape)} {name} tensor, got {out.dtype} of shape "
                                 f"{tuple(out.shape)}")
            if is_distributed():
                out.zero_()
            self.out = out
        else:
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
    file's pages. :meth:`flush` writes the pages to the file and drops them from
    this process's resident memory, so a long job's RSS does not grow with the file.

    Args:
        path: the ``.npy`` file (created, or overwritten).
        shape: the full result's shape; ``shape[sample_dim]`` is the number of samples.
        dtype: float16, float32 or float64.
        sample_dim: the dimension that indexes samples.
        resume: open the existing file instead, keeping its contents; it must be a
            complete ``.npy`` of this shape and dtype (checked: header, and file size
            against the header).
        filled: with `resume`, how many samples the file holds already.
    """

    def __init__(self, path: Union[str, Path], shape: tuple[int, ...], *, dtype: torch.dtype,
                 sample_dim: int = -1, resume: bool = False, filled: int = 0) -> None:
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"MemmapSink: dtype must be one of {list(_NUMPY_DTYPES)}, got {dtype}")
        path = Path(path)
        np_dtype = np.dtype(_NUMPY_DTYPES[dtype])
        if not resume:
            path.parent.mkdir(parents=True, exist_ok=True)
            # open_memmap writes the header and sizes the (sparse) file; it is mapped again below.
            created = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
            del created
        self.path = path
        self.array, self._mapping = _map_npy(path, shape, np_dtype)
        self.out = torch.from_numpy(self.array)
        self.sample_dim = sample_dim % len(shape)
        self.filled = filled if resume else 0

    def write(self, block: Tensor, offset: int) -> None:
        super().write(block.to("cpu"), offset)

    def flush(self) -> None:
        """Writes the written pages to the file (msync) and releases them from the resident set.

        The pages stay in the kernel's page cache; touching them again maps them back.
        """
        if self._mapping is None:
            return
        self._mapping.flush()
        if hasattr(mmap, "MADV_DONTNEED") and hasattr(self._mapping, "madvise"):
            # A shared file mapping keeps its data in the file and the page cache: this only
            # unmaps the pages from this process (no data is lost, and after msync none is dirty).
            self._mapping.madvise(mmap.MADV_DONTNEED)

    def result(self) -> Tensor:
        out = super().result()
        self.flush()
        return out


class SharedMemmapSink(MemmapSink):
    """:class:`MemmapSink` for a distributed job: one ``.npy`` file that every process writes.

    Rank 0 creates the file; the others map it once it exists. Each process writes
    the columns of its own blocks, so no values are exchanged: :meth:`gather` only
    flushes and waits for the others, and every process returns the same file.
    The file must be on storage all processes see (one machine, or a shared
    filesystem). Such a job is not resumable: a rerun starts over.
    """

    def __init__(self, path: Union[str, Path], shape: tuple[int, ...], *, dtype: torch.dtype,
                 sample_dim: int = -1) -> None:
        if is_main_process():
            super().__init__(path, shape, dtype=dtype, sample_dim=sample_dim)
            barrier()
        else:
            barrier()  # the file exists, header written, once rank 0 passes this point
            super().__init__(path, shape, dtype=dtype, sample_dim=sample_dim, resume=True)

    def gather(self) -> None:
        self.flush()
        barrier()  # every process's columns are in the file
        self.filled = all_reduce_count(self.filled, torch.device("cpu"))


def _map_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, Optional[mmap.mmap]]:
    """A writable array over the data of the ``.npy`` file `path`, after checking the file is whole."""
    offset = npy_data_offset(path, shape, dtype)
    if math.prod(shape) == 0:
        return np.empty(shape, dtype), None  # nothing to map (mmap refuses an empty length)
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 0)  # the mapping keeps its own handle on the file
    return np.ndarray(shape, dtype=dtype, buffer=mapping, offset=offset), mapping


def npy_data_offset(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The byte offset of the array in the ``.npy`` file `path`, checked to hold a whole `shape` array.

    Raises:
        ValueError: when the file is not a ``.npy`` file, holds another shape, dtype or
            order, or its size is not header + data (truncated, or more than the array).
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npy file (truncated or corrupt header: {e})") from None
    saved_shape, fortran_order, saved_dtype = header
    if tuple(saved_shape) != tuple(shape) or saved_dtype != dtype or fortran_order:
        order = "Fortran-ordered " if fortran_order else ""
        raise ValueError(f"{path} holds a {order}{tuple(saved_shape)} {saved_dtype} array, expected a "
                         f"C-ordered {tuple(shape)} {dtype} one")
    expected = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(f"{path} is truncated or corrupt: its header promises a {tuple(shape)} {dtype} "
                         f"array ({expected} bytes with the header), but the file has {actual} bytes")
    return offset


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


class RowsSink(ScoreSink):
    """Passes rows `rows` of each (rows, b) block on to `sink`: one scoring pass, several results.

    Args:
        sink: where those rows go.
        rows: an index or slice of the first dimension (an int drops that dimension).
    """

    def __init__(self, sink: ScoreSink, rows: Union[int, slice]) -> None:
        self.sink, self.rows = sink, rows

    def write(self, block: Tensor, offset: int) -> None:
        self.sink.write(block[self.rows], offset)

    def gather(self) -> None:
        self.sink.gather()

    def result(self):
        return self.sink.result()
