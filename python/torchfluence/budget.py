"""Memory and chunk budgets: how much one step of a computation may hold at once.

Every rule here derives from the device model alone: a CPU's cache sizes (fixed
constants below) or a GPU's total memory and L2 cache, never from free memory or
timing. A run therefore cuts its work into the same chunks, and so gets the same
bits, whatever else is allocated and however fast the machine is that day.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["chunk_columns", "gradient_block_samples", "low_rank_block_samples", "query_bytes", "query_rows",
           "score_chunk_columns", "store_chunk_rows", "temporary_rows", "vmap_call_elements"]

# Test-side vectors of a solve (gradients, their solves): 1/16 of a GPU's memory, 1 GiB on a CPU.
QUERY_FRACTION = 16
CPU_QUERY_BYTES = 1 << 30
# Per-sample intermediates of captured-layer scoring on a CPU: 64 MiB in float32 (cache-friendly).
CPU_BLOCK_ELEMENTS = 1 << 24
# The same on a GPU, as a fraction of its memory: 2.5 GB on an 80 GB card.
GPU_BLOCK_FRACTION = 32
# K-FAC's eigenbasis temporaries on a CPU: 16 MiB of float32, below the allocator's mmap threshold.
TEMPORARY_ELEMENTS = 1 << 22
# The same on a GPU, as a fraction of its memory: 1.25 GB on an 80 GB card, where a
# (rows, 512, 4608) float32 rotation at ~130 rows is still one large batched GEMM.
GPU_TEMPORARY_FRACTION = 64
# Columns of a score chunk are a multiple of this (whole GEMM tiles), and never fewer.
SCORE_CHUNK_ALIGN = 256
# Stored 16-bit gradients read per chunk when a gradient store scores.
STORE_CHUNK_BYTES = 32 << 20
# Elements (vectors x samples x per-sample footprint) of one vmapped product on a CPU:
# 2^23 float32 values are 32 MiB, about a server CPU's L2 + L3 share per process.
VMAP_CPU_ELEMENTS = 1 << 23

_l2_bytes: dict[int, int] = {}  # CUDA device index -> its L2 cache size (a property of the model)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def query_bytes(device: torch.device) -> int:
    """Bytes that the test-side vectors of one solve may hold on `device`.

    1/16 of a GPU's total memory, 1 GiB on a CPU: with millions of parameters a full
    block of test gradients (and their solves) would not fit beside the scoring layout.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // QUERY_FRACTION
    return CPU_QUERY_BYTES


def query_rows(num_params: int, dtype: torch.dtype, device: torch.device, *, copies: int,
               most: Optional[int] = None) -> int:
    """Test rows per solve when each row holds `copies` p-vectors of `dtype`, within :func:`query_bytes`.

    Args:
        num_params: p, the length of each vector.
        dtype: the vectors' dtype.
        device: where they are held.
        copies: p-vectors held per row (a gradient and its solve: 2).
        most: an upper bound on the rows (the block size), or None.

    Returns:
        At least 1, at most `most`.
    """
    rows = query_bytes(device) // (copies * num_params * _element_size(dtype))
    return max(1, rows if most is None else min(most, rows))


def gradient_block_samples(d_in: int, d_out: int, dtype: torch.dtype, device: torch.device) -> int:
    """Samples per block of (b, d_out, d_in) per-sample gradients of a captured layer (at least 1).

    On a CPU a block holds :data:`CPU_BLOCK_ELEMENTS` values whatever the dtype (it stays
    in cache). On a GPU the block is the right-hand side of one GEMM with the queries; it
    must hold hundreds of samples for the GEMM to run at tensor-core rate and to read the
    queries once per block instead of once per few samples, so it takes
    1/:data:`GPU_BLOCK_FRACTION` of the device's memory.
    """
    if device.type == "cuda":
        elements = torch.cuda.get_device_properties(device).total_memory // GPU_BLOCK_FRACTION
        elements //= _element_size(dtype)
    else:
        elements = CPU_BLOCK_ELEMENTS
    return max(1, elements // (d_in * d_out))


def low_rank_block_samples(per_sample: int) -> int:
    """Samples per block of low-rank scoring intermediates holding `per_sample` values per sample.

    :data:`CPU_BLOCK_ELEMENTS` values on every device: the (b T, n_query r) projections
    are small next to a per-sample gradient block, so no device needs more.
    """
    return max(1, CPU_BLOCK_ELEMENTS // max(1, per_sample))


def temporary_rows(per_row: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk of a product whose temporaries hold `per_row` values of `dtype` per row
    (K-FAC's eigenbasis).

    On a CPU the temporaries stay under :data:`TEMPORARY_ELEMENTS` float32 values: larger
    ones exceed the allocator's mmap threshold (32 MiB), are returned to the OS when freed
    and are page-faulted in again by the next chunk, which measured 3x slower than the
    product itself. On a GPU a chunk's temporary takes at most 1/:data:`GPU_TEMPORARY_FRACTION`
    of the device's total memory: a ResNet-9's 512 x 4608 layer over a 1024-sample block
    would otherwise hold 9.7 GB per temporary.
    """
    per_row = max(1, per_row)
    if device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory // GPU_TEMPORARY_FRACTION
        return max(1, budget // (per_row * _element_size(dtype)))
    if device.type != "cpu":
        return 1 << 62
    return max(1, TEMPORARY_ELEMENTS * 4 // (per_row * _element_size(dtype)))


def score_chunk_columns(n_query: int, device: torch.device) -> Optional[int]:
    """Training columns per chunk of :meth:`StreamingTopK.update` on `device` (None: one chunk).

    On a GPU, a chunk's float32 scores take at most half of the L2 cache, so that
    ``topk_merge`` reads them from L2 right after the GEMM wrote them. The size
    depends on the device model only (never on timing or free memory); the top-k
    does not depend on it at all, since the merge order is total. CPUs keep one
    product per block, the route measured there (``benchmarks/RESULTS.md``).
    """
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _l2_bytes:
        _l2_bytes[index] = int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0))
    return chunk_columns(n_query, _l2_bytes[index])


def chunk_columns(n_query: int, l2_bytes: int) -> Optional[int]:
    """Columns whose (n_query, columns) float32 scores fill at most half of `l2_bytes` (None: unknown L2).

    A multiple of :data:`SCORE_CHUNK_ALIGN` (whole GEMM tiles), and never fewer.
    """
    if l2_bytes <= 0:
        return None
    columns = l2_bytes // 2 // (4 * max(1, n_query))
    return max(SCORE_CHUNK_ALIGN, columns // SCORE_CHUNK_ALIGN * SCORE_CHUNK_ALIGN)


def store_chunk_rows(k: int) -> int:
    """Rows of a gradient store's (n_train, k) 16-bit matrix read per chunk when scoring.

    :data:`STORE_CHUNK_BYTES` of stored values: each chunk is copied from the memory map
    and widened to float32 (twice its size) before its product with the queries.
    """
    return max(1, STORE_CHUNK_BYTES // (2 * k))


def vmap_call_elements(device: torch.device) -> Optional[int]:
    """Elements (vectors x samples x per-sample footprint) of one vmapped curvature product, or None.

    On a CPU the double backward runs elementwise, memory-bound passes, whose speed
    depends on whether their tensors stay in cache (:mod:`torchfluence.chunking`), so a
    call holds :data:`VMAP_CPU_ELEMENTS`. Elsewhere (None) the whole product is one call:
    a GPU's throughput wants large calls.
    """
    return VMAP_CPU_ELEMENTS if device.type == "cpu" else None
