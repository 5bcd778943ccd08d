"""Plain-PyTorch twins of the compiled kernels: the oracle the tests compare against.

Each function computes in float64 and makes no attempt to be fast. Nothing here
imports the package's own code, so the oracle never shares a bug with what it checks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class TopKReference(NamedTuple):
    """Per-query extremes, each (n_query, min(k, n)); field names as :class:`torchfluence.TopKResult`."""

    largest_values: Tensor
    largest_indices: Tensor
    smallest_values: Tensor
    smallest_indices: Tensor


def select_topk(values: Tensor, indices: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Top-k along dim 1 by (value, then lower index); entries with index -1 or a non-finite value sort last.

    A row-by-row NumPy lexsort: slow, and independent of the compiled merge.

    Args:
        values, indices: (n, m) candidates.
    Returns:
        (n, min(k, m)) values and indices.
    """
    v = values.detach().double().cpu().numpy()
    i = indices.detach().cpu().numpy()
    keep = min(k, v.shape[1])
    out_v, out_i = np.empty((v.shape[0], keep)), np.empty((v.shape[0], keep), dtype=np.int64)
    for row in range(v.shape[0]):
        invalid = (i[row] < 0) | ~np.isfinite(v[row])
        key = -v[row] if largest else v[row]
        order = np.lexsort((i[row], np.where(invalid, 0.0, key), invalid))[:keep]  # last key sorts first
        out_v[row], out_i[row] = v[row][order], i[row][order]
    return (torch.from_numpy(out_v).to(values.dtype).to(values.device),
            torch.from_numpy(out_i).to(values.device))


def influence_block_reference(S: Tensor, G: Tensor, offset: int = 0, k: int = 0) -> tuple[Tensor, TopKReference]:
    """Scores and exact top-k of ``S @ G.T`` in float64.

    Args:
        S: (n_query, p) query vectors.
        G: (b, p) training vectors with global indices ``offset .. offset + b``.
        offset: global index of G's first row.
        k: top-k size (0 for none).

    Returns:
        scores (n_query, b) float64, and the top-k by (value, lower index) on both ends,
        each (n_query, min(k, b)).
    """
    scores = S.double() @ G.double().T
    index = torch.arange(offset, offset + G.shape[0], dtype=torch.int64, device=S.device).expand_as(scores)
    lv, li = select_topk(scores, index, k, largest=True)
    sv, si = select_topk(scores, index, k, largest=False)
    return scores, TopKReference(lv, li, sv, si)


def psg_dot_reference(Q: Tensor, A: Tensor, D: Tensor) -> Tensor:
    """``scores[q, j] = <Q[q], sum_t D[j, t] A[j, t]^T>`` in float64, per-sample gradients materialised.

    Args:
        Q: (n_query, d_out, d_in) query matrices.
        A: (n, T, d_in) activations.
        D: (n, T, d_out) output gradients.

    Returns:
        (n_query, n) float64.
    """
    grads = torch.einsum("nto,nti->noi", D.double(), A.double())
    return Q.double().flatten(1) @ grads.flatten(1).T


def linear_head_hvp_reference(features: Tensor, weight: Tensor, bias, vectors: Tensor,
                              loss: str = "cross_entropy") -> Tensor:
    """H V for a linear head by autograd (double backward) in float64, (k, C, d[+1]).

    Independent of the closed form: it differentiates the mean loss of
    ``F.linear(features, W, b)`` twice. The Hessians do not depend on the targets,
    so fixed ones are used.
    """
    x = features.double()
    n, d = x.shape
    C = weight.shape[0]
    losses = {"cross_entropy": (F.cross_entropy, torch.zeros(n, dtype=torch.long, device=x.device)),
              "mse": (F.mse_loss, torch.zeros(n, C, dtype=torch.float64, device=x.device)),
              "bce_with_logits": (F.binary_cross_entropy_with_logits,
                                  torch.full((n, C), 0.5, dtype=torch.float64, device=x.device))}
    loss_fn, targets = losses[loss]
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    params = [w] if b is None else [w, b]
    grads = torch.autograd.grad(loss_fn(F.linear(x, w, b), targets), params, create_graph=True)
    out = torch.empty_like(vectors, dtype=torch.float64)
    for i, v in enumerate(vectors.double()):
        dot = (grads[0] * v[:, :d]).sum() + (0 if b is None else (grads[1] * v[:, d]).sum())
        hv = torch.autograd.grad(dot, params, retain_graph=True)
        out[i, :, :d] = hv[0]
        if b is not None:
            out[i, :, d] = hv[1]
    return out


# ---------------------------------------------------------------------------
# Random projections (torchfluence.projectors). Each twin builds its explicit
# matrix from the documented recipe and multiplies in float64.

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (NumPy array arithmetic wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_seed_reference(seed: int, stream: int) -> int:
    """The torch.Generator seed of random stream `stream` of a projector seeded with `seed`."""
    key = _mix64(np.array([(seed + _GOLDEN) & _MASK64], dtype=np.uint64))
    z = _mix64(key + np.array([((stream + 1) * _GOLDEN) & _MASK64], dtype=np.uint64))
    return int(z[0] >> np.uint64(1))


def sjlt_codes_reference(seed: int, columns, k: int, s: int) -> tuple[Tensor, Tensor]:
    """Buckets and signs of the SJLT's non-zeros for the given global columns.

    Column c has one non-zero in each of the s row blocks ``[j*k//s, (j+1)*k//s)``;
    its hash is ``mix64(mix64(seed + golden) + (c*s + j + 1) * golden)`` (SplitMix64);
    the bucket is the block's first row plus ``((h >> 32) * block_size) >> 32``; the
    sign is negative when ``h`` is odd.

    Args:
        columns: (m,) global column indices in [0, 2**63), any integer sequence.

    Returns:
        (m, s) int64 buckets and (m, s) float64 signs (+1 or -1).
    """
    cols = np.asarray([int(c) for c in columns], dtype=np.uint64).reshape(-1, 1)
    j = np.arange(s, dtype=np.uint64).reshape(1, -1)
    key = _mix64(np.array([(seed + _GOLDEN) & _MASK64], dtype=np.uint64))
    h = _mix64(key + (cols * np.uint64(s) + j + np.uint64(1)) * np.uint64(_GOLDEN))
    jj = np.arange(s, dtype=np.int64).reshape(1, -1)
    lo, hi = jj * k // s, (jj + 1) * k // s
    local = ((h >> np.uint64(32)) * (hi - lo).astype(np.uint64)) >> np.uint64(32)
    buckets = lo + local.astype(np.int64)
    signs = np.where((h & np.uint64(1)) == 1, -1.0, 1.0)
    return torch.from_numpy(buckets), torch.from_numpy(signs)


def sjlt_matrix_reference(p: int, k: int, s: int, seed: int, offset: int = 0) -> Tensor:
    """Columns ``[offset, offset + p)`` of the SJLT matrix, dense (k, p) float64, entries +-1/sqrt(s)."""
    buckets, signs = sjlt_codes_reference(seed, range(offset, offset + p), k, s)
    matrix = torch.zeros(k, p, dtype=torch.float64)
    cols = torch.arange(p).reshape(-1, 1).expand(p, s)
    matrix.index_put_((buckets.reshape(-1), cols.reshape(-1)), signs.reshape(-1) / s ** 0.5, accumulate=True)
    return matrix


def sjlt_reference(G: Tensor, k: int, s: int, seed: int, offset: int = 0) -> Tensor:
    """``G @ P[:, offset : offset + p_block].T`` for the SJLT, in float64 on the CPU.

    Args:
        G: (n, p_block).

    Returns:
        (n, k) float64.
    """
    return G.detach().double().cpu() @ sjlt_matrix_reference(G.shape[1], k, s, seed, offset).T


def dense_matrix_reference(p: int, k: int, seed: int, distribution: str = "gaussian",
                           chunk: int = 1024) -> Tensor:
    """The DenseProjector matrix, (k, p) float64: column chunk i drawn from its own seeded generator.

    Gaussian entries are N(0, 1/k), Rademacher entries +-1/sqrt(k).
    """
    parts = []
    for i, c0 in enumerate(range(0, p, chunk)):
        gen = torch.Generator().manual_seed(stream_seed_reference(seed, i))
        w = min(chunk, p - c0)
        if distribution == "gaussian":
            parts.append(torch.randn(k, w, generator=gen, dtype=torch.float64))
        else:
            parts.append(torch.randint(0, 2, (k, w), generator=gen).double() * 2 - 1)
    return torch.cat(parts, dim=1) / k ** 0.5 if parts else torch.zeros(k, 0, dtype=torch.float64)


def kronecker_factors_reference(d_out: int, d_in: int, k_out: int, k_in: int,
                                seed: int) -> tuple[Tensor, Tensor]:
    """The KroneckerProjector factors in float64.

    Returns:
        P_out (k_out, d_out) with N(0, 1/k_out) entries and P_in (k_in, d_in) with N(0, 1/k_in) entries.
    """
    p_out = torch.randn(k_out, d_out, generator=torch.Generator().manual_seed(stream_seed_reference(seed, 0)),
                        dtype=torch.float64)
    p_in = torch.randn(k_in, d_in, generator=torch.Generator().manual_seed(stream_seed_reference(seed, 1)),
                       dtype=torch.float64)
    return p_out / k_out ** 0.5, p_in / k_in ** 0.5


def kronecker_reference(A: Tensor, D: Tensor, k_out: int, k_in: int, seed: int) -> Tensor:
    """``(P_out kron P_in) vec(sum_t D_t A_t^T)`` per sample, with the gradients and the product materialised.

    Args:
        A: (n, T, d_in) layer inputs; D: (n, T, d_out) output gradients.

    Returns:
        (n, k_out * k_in) float64 (row-major flattening of the (k_out, k_in) projected gradient).
    """
    p_out, p_in = kronecker_factors_reference(D.shape[2], A.shape[2], k_out, k_in, seed)
    grads = torch.einsum("nto,nti->noi", D.detach().double().cpu(), A.detach().double().cpu())
    return grads.flatten(1) @ torch.kron(p_out, p_in).T
