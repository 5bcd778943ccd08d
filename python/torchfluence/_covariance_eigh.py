"""Eigendecomposition of a covariance factor whose rows and columns may be exactly zero."""

from __future__ import annotations

import torch
from torch import Tensor


def covariance_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of the symmetric part of `matrix`: ascending eigenvalues, eigenvector columns.

    Coordinates whose row and column are exactly zero (inputs that are always zero: the padding taps
    of a 3x3 convolution on a 1x1 feature map, as in a ResNet-18's last stage at 32 x 32 inputs, or
    dead units) are eigenvectors with eigenvalue 0 as they are; only the other rows and columns are
    decomposed. LAPACK can fail to converge on the whole matrix (a ResNet-18's 4608 x 4608 factors
    with 511 live coordinates do), and the smaller problem is also much faster.
    """
    sym = 0.5 * (matrix + matrix.T)
    live = (sym != 0).any(dim=0)
    if bool(live.all()):
        return torch.linalg.eigh(sym)
    d, kept = sym.shape[0], live.nonzero().flatten()
    values, vectors = sym.new_zeros(d), sym.new_zeros(d, d)
    n_dead = d - kept.numel()
    vectors[~live, torch.arange(n_dead, device=sym.device)] = 1.0
    if kept.numel():
        l_kept, q_kept = torch.linalg.eigh(sym[kept][:, kept])
        values[n_dead:] = l_kept
        vectors[kept.unsqueeze(1), torch.arange(n_dead, d, device=sym.device)] = q_kept
    order = values.argsort(stable=True)
    return values[order], vectors[:, order]
