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
