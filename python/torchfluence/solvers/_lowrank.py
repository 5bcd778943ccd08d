"""A low-rank eigen-approximation of the curvature and its regularized inverse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Complement = Literal["regularization", "drop"]


@dataclass
class LowRankCurvature:
    """H ~ U^T diag(eigenvalues) U with orthonormal rows U.

    Attributes:
        eigenvectors: (r, p) orthonormal rows.
        eigenvalues: (r,).
    """

    eigenvectors: Tensor
    eigenvalues: Tensor

    def inverse_apply(self, vectors: Tensor, regularization: float, complement: Complement) -> Tensor:
        """(H + lambda I)^-1 times each row of `vectors` (k, p) -> (k, p).

        ``complement="regularization"`` treats H as zero on the orthogonal
        complement of U, so it contributes ``(I - U^T U) v / lambda`` (the
        Woodbury inverse of the low-rank-plus-lambda matrix); ``"drop"`` keeps
        only the projection onto U.
        """
        u = self.eigenvectors
        coeffs = vectors @ u.T  # (k, r)
        out = (coeffs / (self.eigenvalues + regularization)) @ u
        if complement == "regularization":
            out = out + (vectors - coeffs @ u) / regularization
        return out

    def preconditioner_apply(self, vectors: Tensor, regularization: float) -> Tensor:
        """A preconditioner for CG on H + lambda I (Frangella, Tropp & Udell 2023).

        P^-1 = (l_r + lambda) U^T (diag(l) + lambda)^-1 U + (I - U^T U), with l_r
        the smallest kept eigenvalue: it maps the captured spectrum to about
        l_r + lambda and leaves the rest, which is below l_r, alone.
        """
        u = self.eigenvectors
        coeffs = vectors @ u.T
        smallest = self.eigenvalues.min()
        return ((smallest + regularization) * coeffs / (self.eigenvalues + regularization)) @ u + (vectors - coeffs @ u)


def check_rank(rank: int, num_params: int, name: str = "rank") -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{name} must be a positive int, got {rank!r}")
    if rank > num_params:
        raise ValueError(f"{name} must be at most the number of parameters ({num_params}), got {rank}")


def check_complement(complement: str) -> None:
    if complement not in ("regularization", "drop"):
        raise ValueError(f"complement must be 'regularization' or 'drop', got {complement!r}")


def orthonormal_rows(m: Tensor) -> Tensor:
    """Orthonormal basis of the row space of m (k, p) as (k, p) rows (QR in float64 for stability)."""
    q, _ = torch.linalg.qr(m.double().T)
    return q.T.to(m.dtype)
