"""Per-sample-gradient dot products for captured layers, without per-sample gradients in memory.

A Linear or Conv2d layer's per-sample gradient is ``G_j = sum_t D[j, t] A[j, t]^T``
(output gradients times inputs, summed over positions). Scoring it against a
query matrix ``Q`` needs only ``<Q, G_j>``; :func:`psg_dot` computes that for all
queries and samples at once.

An index layer (``nn.Embedding``) has one-hot inputs: ``A[j, t] = e_{id[j, t]}``.
Its activations are the integer ids (n, T), and ``<Q, G_j> = sum_t Q[:, id[j, t]] . D[j, t]``
gathers one column of Q per position instead of multiplying by a one-hot vector.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .budget import gradient_block_samples, low_rank_block_samples
from .ops import accumulation_dtype, cuda_available_in_build, psg_dot_accumulate
from .ops import psg_dot as psg_dot_kernel
from .precision import SCORE_DTYPES, matmul_float32, native_16bit_products

Queries = Union[Tensor, tuple[Tensor, Tensor]]

def psg_dot(queries: Queries, activations: Tensor, output_grads: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    """``scores[q, j] = <Q[q], sum_t D[j, t] A[j, t]^T>`` for one captured layer.

    Args:
        queries: (n_query, d_out, d_in) query matrices, or a pair ``(U, V)`` of
            (n_query, d_out, r) and (n_query, d_in, r) meaning ``Q[q] = U[q] @ V[q]^T``.
        activations: (n, T, d_in) layer inputs per sample and position (T = 1 for a
            plain Linear layer, patches for Conv2d, tokens for sequences); or (n, T)
            integer indices in [0, d_in) meaning one-hot inputs ``A[j, t] = e_{id}``
            (an embedding: d_in is the vocabulary, d_out the embedding width).
        output_grads: (n, T, d_out) loss gradients w.r.t. the layer outputs.
        out: optional (n_query, n) tensor in the accumulation dtype to add the scores to
            (to sum over layers).

    Returns:
        (n_query, n) scores, float64 for float64 inputs and float32 otherwise.

    The contraction order follows the shapes:

    - T = 1, full queries, CPU: the compiled kernel, which forms each per-sample
      gradient only as a cache-sized packed panel (no n x p memory at all).
    - T > 1, or CUDA: per-sample gradients of a block of samples by one
      batched matmul (their formation then costs T flops per entry, well
      vectorised), scored with a matmul; memory is one block, never n x p.
    - Low-rank queries: ``sum_t sum_r (D[j,t] . U[q,:,r]) (A[j,t] . V[q,:,r])``,
      ``T r (d_in + d_out)`` per (query, sample) instead of ``d_in d_out``; when
      that is the larger, ``U V^T`` is formed and the full path runs.
    - Integer activations: each position gathers its id's column of the queries
      (``T d_out`` per (query, sample), whatever d_in is); low-rank queries gather
      rows of V, unless forming ``U V^T`` once costs less.
    """
    low_rank = isinstance(queries, tuple)
    n_query, d_out, d_in = _check(queries, activations, output_grads)
    n = activations.shape[0]
    ref = queries[0] if low_rank else queries
    acc = accumulation_dtype(ref.dtype)
    if out is None:
        out = torch.zeros(n_query, n, dtype=acc, device=ref.device)
    elif out.shape != (n_query, n) or out.dtype != acc or out.device != ref.device:
        raise ValueError(f"psg_dot: out must be a ({n_query}, {n}) {acc} tensor on {ref.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    T = activations.shape[1]
    if not activations.is_floating_point():
        if low_rank:
            rank = queries[0].shape[2]
            if n * T * rank * (d_out + 1) <= d_in * d_out * rank + n * T * d_out:
                return _index_low_rank(queries, activations, output_grads, out)
            queries = queries[0] @ queries[1].transpose(1, 2)
        rows = queries.transpose(1, 2).reshape(n_query, d_in * d_out)  # (n_query, d_in * d_out): id rows
        return score_index_layer(rows, activations, output_grads, out)
    if low_rank:
        rank = queries[0].shape[2]
        if T * rank * (d_in + d_out) <= d_in * d_out:
            return _low_rank(queries, activations, output_grads, out)
        queries = queries[0] @ queries[1].transpose(1, 2)
    return score_layer(queries.reshape(n_query, d_out * d_in), activations, output_grads, out)


def score_layer(Q: Tensor, A: Tensor, D: Tensor, out: Tensor) -> Tensor:
    """Adds one layer's scores ``<Q[q], sum_t D[j,t] A[j,t]^T>`` to `out` (n_query, n); no input checks.

    Args:
        Q: (n_query, d_out * d_in) query matrices, flattened row-major; their dtype is
            the operand dtype of the products (16-bit: tensor cores, float32 results).
        A: (n, T, d_in); D: (n, T, d_out), any floating dtype (cast block by block).
        out: (n_query, n) float32 (float64 for float64 queries).
    """
    T = A.shape[1]
    on_cpu_kernel = Q.device.type == "cpu" and psg_dot_kernel.supports(Q.dtype, Q.device)
    if T == 1 and on_cpu_kernel and A.dtype == D.dtype == Q.dtype:
        # The compiled kernel forms each gradient only as a cache-sized panel; it reads any strides.
        psg_dot_accumulate(Q, A, D, out)
        return out
    # Elsewhere the per-sample gradients of a block go through cuBLAS / MKL: the CUDA
    # kernel (``ops.psg_dot_accumulate``, tested against the same reference) is an FMA
    # tile kernel, slower than the tensor-core GEMMs of this route.
    return _gradient_blocks(Q, A, D, out)


def score_index_layer(Q: Tensor, ids: Tensor, D: Tensor, out: Tensor) -> Tensor:
    """Adds an index layer's scores ``sum_t Q[q, id[j,t], :] . D[j,t]`` to `out` (n_query, n); no input checks.

    Args:
        Q: (n_query, d_in * d_out) queries in the layer's stored layout: (d_in, d_out)
            row-major, one contiguous row per index. Its dtype is the operand dtype:
            16-bit operands are rounded from D too, and products are summed in `out`'s dtype.
        ids: (n, T) integer indices in [0, d_in).
        D: (n, T, d_out) output gradients.
        out: (n_query, n) float32 (float64 for float64 queries).

    Gathering the rows of the ids costs ``T d_out`` per (query, sample), whatever
    d_in (the vocabulary) is, and never forms a one-hot vector or a per-sample gradient.
    """
    n_query, acc = Q.shape[0], out.dtype
    n, T = ids.shape
    d_out = D.shape[2]
    rows = Q.view(n_query, -1, d_out)  # (n_query, d_in, d_out)
    block = gradient_block_samples(T, n_query * d_out, acc, Q.device)  # the gathered rows of a block
    for start in range(0, n, block):
        i, d = ids[start:start + block], D[start:start + block]
        b = i.shape[0]
        gathered = rows[:, i.reshape(-1)].to(acc)  # (n_query, b * T, d_out)
        d = d.reshape(b * T, d_out).to(Q.dtype).to(acc)  # the operand's rounding, summed in acc
        dots = torch.einsum("qpo,po->qp", gathered, d)  # (n_query, b * T)
        out[:, start:start + b] += dots.view(n_query, b, T).sum(dim=2)
    return out


def _index_low_rank(queries: tuple[Tensor, Tensor], ids: Tensor, D: Tensor, out: Tensor) -> Tensor:
    """Low-rank queries on an index layer: ``sum_t sum_r (D[j,t] . U[q,:,r]) V[q, id[j,t], r]``."""
    U, V = queries
    n_query, rank = U.shape[0], U.shape[2]
    n, T = ids.shape
    U_flat = U.permute(1, 0, 2).reshape(U.shape[1], n_query * rank).to(out.dtype)  # (d_out, n_query * r)
    V_rows = V.permute(1, 0, 2).reshape(V.shape[1], n_query * rank).to(out.dtype)  # (d_in, n_query * r)
    block = low_rank_block_samples(T * n_query * rank)
    for start in range(0, n, block):
        i, d = ids[start:start + block], D[start:start + block].to(out.dtype)
        b = i.shape[0]
        projected = (d.reshape(b * T, -1) @ U_flat) * V_rows[i.reshape(-1)]  # (b * T, n_query * r)
        out[:, start:start + b] += projected.view(b, T, n_query, rank).sum(dim=(1, 3)).T
    return out


def index_sum(index: Tensor, values: Tensor, size: int) -> Tensor:
    """``out[i] = sum of values[k] over the k with index[k] == i``, (size, *values.shape[1:]).

    The same bits on every run: on the CPU ``index_add_`` adds the rows in order;
    on CUDA ``index_put_(accumulate=True)`` sorts the indices and adds duplicates in
    order (CUDA's ``index_add_`` uses atomics, whose order varies from run to run).

    Args:
        index: (m,) integer indices in [0, size).
        values: (m, ...) rows to add.
    """
    out = values.new_zeros(size, *values.shape[1:])
    if values.device.type == "cpu":
        return out.index_add_(0, index, values)
    return out.index_put_((index,), values, accumulate=True)


def index_pair_sums(ids: Tensor, output_grads: Tensor, d_in: int) -> tuple[Tensor, Tensor, Tensor]:
    """The nonzero columns of an index layer's per-sample gradients.

    ``G_j = sum_t e_{id[j,t]} D[j,t]^T`` (d_in, d_out) has one nonzero row per distinct
    id of sample j: the sum of D over the positions holding it.

    Args:
        ids: (n, T) integer indices in [0, d_in); output_grads: (n, T, d_out).

    Returns:
        samples (u,), indices (u,) and rows (u, d_out), one per distinct (sample, index)
        pair, sorted by sample then index.
    """
    n, T = ids.shape
    keys = (torch.arange(n, device=ids.device).unsqueeze(1) * d_in + ids).reshape(-1)
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    rows = index_sum(inverse, output_grads.reshape(n * T, -1), unique.numel())
    return unique // d_in, unique % d_in, rows


def _gradient_blocks(Q: Tensor, A: Tensor, D: Tensor, out: Tensor) -> Tensor:
    n, d_in, d_out = A.shape[0], A.shape[2], D.shape[2]
    operand = Q.dtype
    # Where 16-bit products are not native (most CPUs; fp16 on any CPU) the 16-bit operands
    # are formed in float32 from rounded inputs and rounded again: the values a native
    # 16-bit product (float32 sums, one rounding of the result) gives.
    widen = operand in SCORE_DTYPES and not native_16bit_products(Q.device, operand)
    # One buffer for every block's gradients: a fresh (block, d_out, d_in) tensor above the
    # allocator's mmap threshold is page-faulted in again each time (3x the product's cost).
    rows = min(gradient_block_samples(d_in, d_out, operand, Q.device), n)
    buffer = None if widen else torch.empty(rows, d_out, d_in, dtype=operand, device=Q.device)

    def grads(start: int, stop: int) -> Tensor:
        a, d = A[start:stop].to(operand), D[start:stop].to(operand)
        if widen:
            return (d.float().transpose(1, 2) @ a.float()).to(operand)
        return torch.bmm(d.transpose(1, 2), a, out=buffer[:stop - start])  # sum_t D[j,t] A[j,t]^T

    return score_gradients(Q, grads, n, d_in, d_out, out)


def score_gradients(Q: Tensor, grads: Callable[[int, int], Tensor], n: int, d_in: int, d_out: int,
                    out: Tensor) -> Tensor:
    """Adds one layer's scores ``<Q[q], G_j>`` to `out` (n_query, n), from its per-sample gradients.

    Args:
        Q: (n_query, d_out * d_in) query matrices, flattened row-major, in the gradients' dtype.
        grads: ``(start, stop) -> (stop - start, d_out, d_in)`` per-sample gradients of those samples.
        n: samples; out: (n_query, n) in Q's accumulation dtype.
    """
    block = gradient_block_samples(d_in, d_out, Q.dtype, Q.device)
    for start in range(0, n, block):
        g = grads(start, min(start + block, n))
        out[:, start:start + g.shape[0]] += matmul_float32(Q, g.flatten(1).T)
    return out


def _low_rank(queries: tuple[Tensor, Tensor], A: Tensor, D: Tensor, out: Tensor) -> Tensor:
    U, V = queries
    n_query, rank = U.shape[0], U.shape[2]
    n, T = A.shape[0], A.shape[1]
    block = low_rank_block_samples(T * n_query * rank)
    U_flat = U.permute(1, 0, 2).reshape(U.shape[1], n_query * rank).to(out.dtype)  # (d_out, n_query * r)
    V_flat = V.permute(1, 0, 2).reshape(V.shape[1], n_query * rank).to(out.dtype)  # (d_in, n_query * r)
    for start in range(0, n, block):
        a, d = A[start:start + block].to(out.dtype), D[start:start + block].to(out.dtype)
        projected = (d @ U_flat) * (a @ V_flat)  # (b, T, n_query * r)
        out[:, start:start + a.shape[0]] += projected.view(a.shape[0], T, n_query, rank).sum(dim=(1, 3)).T
    return out


def _check(queries: Queries, A: Tensor, D: Tensor) -> tuple[int, int, int]:
    if isinstance(A, Tensor) and not A.is_floating_point() and not A.is_complex():
        return _check_indices(queries, A, D)
    tensors = _three_d_tensors(queries, activations=A, output_grads=D)
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        psg_dot_kernel.check_dtype("psg_dot", name, t)
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"psg_dot: all inputs must share dtype and device; activations is {A.dtype} on "
                             f"{A.device}, {name} is {t.dtype} on {t.device}")
    if A.shape[:2] != D.shape[:2]:
        raise ValueError(f"psg_dot: activations (n, T, d_in) and output_grads (n, T, d_out) must agree in n and T, "
                         f"got {tuple(A.shape)} and {tuple(D.shape)}")
    d_in, d_out = A.shape[2], D.shape[2]
    if isinstance(queries, tuple):
        U, V = queries
        expected_u, expected_v = (U.shape[0], d_out, U.shape[2]), (U.shape[0], d_in, U.shape[2])
        if tuple(U.shape) != expected_u or tuple(V.shape) != expected_v:
            raise ValueError(f"psg_dot: U and V must have shapes (n_query, d_out, r) = {expected_u} and "
                             f"(n_query, d_in, r) = {expected_v}, got {tuple(U.shape)} and {tuple(V.shape)}")
        return U.shape[0], d_out, d_in
    if queries.shape[1:] != (d_out, d_in):
        raise ValueError(f"psg_dot: queries must have shape (n_query, d_out, d_in) = (n_query, {d_out}, {d_in}), "
                         f"got {tuple(queries.shape)}")
    if first.device.type == "cuda" and not cuda_available_in_build():
        raise RuntimeError("psg_dot: tensors are on CUDA but this torchfluence build has no CUDA kernels")
    return queries.shape[0], d_out, d_in


def _three_d_tensors(queries: Queries, **named: Tensor) -> dict[str, Tensor]:
    """`named` and the queries (``queries``, or ``U`` and ``V`` of a low-rank pair) by name, each checked 3-D."""
    tensors = dict(named)
    if isinstance(queries, tuple):
        if len(queries) != 2:
            raise ValueError(f"psg_dot: low-rank queries must be a pair (U, V), got {len(queries)} tensors")
        tensors.update(U=queries[0], V=queries[1])
    else:
        tensors["queries"] = queries
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"psg_dot: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"psg_dot: {name} must be 3-D, got shape {tuple(t.shape)}")
    return tensors


def _check_indices(queries: Queries, ids: Tensor, D: Tensor) -> tuple[int, int, int]:
    """Checks of :func:`psg_dot` with integer activations: one-hot inputs given by their indices."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"psg_dot: integer activations (indices) must be torch.int64 or torch.int32, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"psg_dot: integer activations must be (n, T) indices, got shape {tuple(ids.shape)}")
    tensors = _three_d_tensors(queries, output_grads=D)
    for name, t in tensors.items():
        psg_dot_kernel.check_dtype("psg_dot", name, t)
        if t.dtype != D.dtype or t.device != ids.device:
            raise ValueError(f"psg_dot: queries and output_grads must share dtype, and all inputs the device; "
                             f"output_grads is {D.dtype}, activations on {ids.device}, {name} is {t.dtype} on "
                             f"{t.device}")
    if ids.shape != D.shape[:2]:
        raise ValueError(f"psg_dot: indices (n, T) and output_grads (n, T, d_out) must agree in n and T, got "
                         f"{tuple(ids.shape)} and {tuple(D.shape)}")
    d_out = D.shape[2]
    if isinstance(queries, tuple):
        U, V = queries
        n_query, d_in, rank = V.shape
        if tuple(U.shape) != (n_query, d_out, rank):
            raise ValueError(f"psg_dot: U must have shape (n_query, d_out, r) = ({n_query}, {d_out}, {rank}) to "
                             f"match V {tuple(V.shape)}, got {tuple(U.shape)}")
    else:
        n_query, q_out, d_in = queries.shape
        if q_out != d_out:
            raise ValueError(f"psg_dot: queries must have shape (n_query, d_out, d_in) with d_out = {d_out}, got "
                             f"{tuple(queries.shape)}")
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= d_in:
            raise ValueError(f"psg_dot: indices must lie in [0, d_in) = [0, {d_in}) (d_in from the queries), got "
                             f"values in [{low}, {high}]")
    return n_query, d_out, d_in


def psg_self_dot(weights: Tensor, activations: Tensor, output_grads: Tensor) -> Tensor:
    """The train-train diagonal: ``s[j] = sum_{o,i} W[o, i] G_j[o, i]^2`` with ``G_j = sum_t D[j,t] A[j,t]^T``.

    With activations and output gradients rotated into a Kronecker eigenbasis
    (``A Q_A``, ``D Q_S``) and ``W = 1 / (eigenvalues + lambda)``, this is the
    self-influence ``g_j^T (F + lambda I)^-1 g_j`` of (E)K-FAC for one layer.

    Args:
        weights: (d_out, d_in).
        activations: (n, T, d_in), or (n, T) integer indices in [0, d_in) (one-hot
            inputs of an index layer, whose eigenbasis on that side is the identity).
        output_grads: (n, T, d_out).

    Returns:
        (n,). For T = 1 it is ``((D^2) W (A^2)^T)`` per sample, with no per-sample
        gradient formed; for T > 1 the gradients of a block of samples are formed;
        for indices, only their nonzero rows (one per distinct index of a sample).
    """
    if not activations.is_floating_point():
        d_out, d_in = weights.shape
        if activations.dim() != 2 or output_grads.shape[:2] != activations.shape or output_grads.shape[2] != d_out:
            raise ValueError(f"psg_self_dot: expected (n, T) indices and (n, T, {d_out}) output_grads, got "
                             f"{tuple(activations.shape)} and {tuple(output_grads.shape)}")
        samples, ids, rows = index_pair_sums(activations, output_grads, d_in)
        per_pair = (rows.square() * weights.T[ids]).sum(dim=1)  # (u,)
        return index_sum(samples, per_pair, activations.shape[0])
    n, T, d_in = activations.shape
    d_out = output_grads.shape[2]
    if output_grads.shape[:2] != (n, T) or tuple(weights.shape) != (d_out, d_in):
        raise ValueError(f"psg_self_dot: expected weights ({d_out}, {d_in}), activations (n, T, d_in) and "
                         f"output_grads (n, T, d_out) of one n and T, got {tuple(weights.shape)}, "
                         f"{tuple(activations.shape)}, {tuple(output_grads.shape)}")
    if T == 1:
        return ((output_grads[:, 0].square() @ weights) * activations[:, 0].square()).sum(dim=1)
    out = torch.empty(n, dtype=weights.dtype, device=weights.device)
    block = gradient_block_samples(d_in, d_out, weights.dtype, weights.device)
    for start in range(0, n, block):
        grads = output_grads[start:start + block].transpose(1, 2) @ activations[start:start + block]
        out[start:start + grads.shape[0]] = (grads.square() * weights).sum(dim=(1, 2))
    return out
