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
