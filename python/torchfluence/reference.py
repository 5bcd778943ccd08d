"""Plain-PyTorch twins of the compiled kernels: the oracle the tests compare against.

Each function computes in float64 and makes no attempt to be fast.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .topk import TopKResult, select_topk


def influence_block_reference(S: Tensor, G: Tensor, offset: int = 0, k: int = 0) -> tuple[Tensor, TopKResult]:
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
    return scores, TopKResult(lv, li, sv, si)


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
    """Closed-form linear-head HVP with plain tensor ops in float64 (see ``linear_head_hvp``), (k, C, d[+1])."""
    x, w, v = features.double(), weight.double(), vectors.double()
    b = None if bias is None else bias.double()
    n, d = x.shape
    C = w.shape[0]
    logits = torch.nn.functional.linear(x, w, b)
    u = torch.einsum("nd,kcd->nkc", x, v[..., :d])
    if b is not None:
        u = u + v[..., d]
    if loss == "cross_entropy":
        p = torch.softmax(logits, dim=1).unsqueeze(1)
        r = p * u - p * (p * u).sum(dim=2, keepdim=True)
    elif loss == "mse":
        r = u * (2.0 / C)
    else:
        s = torch.sigmoid(logits).unsqueeze(1)
        r = u * (s * (1 - s)) / C
    out = torch.zeros_like(v)
    out[..., :d] = torch.einsum("nkc,nd->kcd", r, x)
    if b is not None:
        out[..., d] = r.sum(dim=0)
    return out / n
