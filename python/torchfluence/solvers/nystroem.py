"""Randomized Nystrom sketch of the curvature with the Woodbury inverse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..data import Samples
from ..checks import check_regularization
from ..contract import SolverTraits, option
from ..influence import InfluenceFunctionModel
from ..persist import state_tensor
from ._lowrank import LowRankCurvature, check_rank
from .block_diagonal import BlockDiagonal, BlockOptions


@dataclass(frozen=True)
class NystroemOptions(BlockOptions):
    """NystroemSketchInfluence's own options."""

    rank: int = option(fit=True, doc="sketch rank")
    seed: int = option(fit=True, doc="seed of the sketch")


class _NystroemSolve(InfluenceFunctionModel):
    """:class:`NystroemSketchInfluence` over all its parameters at once (its algorithm, without blocks)."""

    def __init__(self, model, loss, regularization: float, rank: int = 10, *, seed: int = 0, **kwargs) -> None:
        super().__init__(model, loss, regularization, **kwargs)
        if self.regularization <= 0:
            raise ValueError(f"regularization must be > 0 for the Woodbury inverse, got {regularization!r}")
        check_rank(rank, self.num_params)
        self.rank, self.seed = rank, seed
        self.low_rank: Optional[LowRankCurvature] = None

    def _fit(self, train: Samples) -> None:
        self.low_rank = nystroem_sketch(self.curvature_vp, self.num_params, self.rank, self.dtype, self.device,
                                        self.seed)
        self._typed = LowRankCurvature(self.low_rank.eigenvectors.to(self.dtype),
                                       self.low_rank.eigenvalues.to(self.dtype))

    def with_regularization(self, regularization: float) -> "NystroemSketchInfluence":
        """Sets lambda (> 0) without refitting; returns self."""
        check_regularization(regularization)
        if regularization <= 0:
            raise ValueError(f"regularization must be > 0 for the Woodbury inverse, got {regularization!r}")
        self.regularization = float(regularization)
        return self

    def solve(self, vectors: Tensor) -> Tensor:
        self._require_fitted()
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        return self._typed.inverse_apply(vectors, self.regularization, "regularization")

    # -- the solver contract: options and fitted state (torchfluence.contract) -----------------------
    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """The sketch's eigenpairs (float64)."""
        return {"eigenvectors": self.low_rank.eigenvectors, "eigenvalues": self.low_rank.eigenvalues}, {}

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        vectors = state_tensor(tensors, "eigenvectors", (self.rank, self.num_params), torch.float64)
        values = state_tensor(tensors, "eigenvalues", (self.rank,), torch.float64)
        self.low_rank = LowRankCurvature(vectors, values)
        self._typed = LowRankCurvature(vectors.to(self.dtype), values.to(self.dtype))


class NystroemSketchInfluence(BlockDiagonal, _NystroemSolve):
    """Approximates H by a rank-r Nystrom sketch from r curvature-vector products.

    One pass over the training data computes Y = H Omega for a Gaussian test
    matrix Omega (p, r); the stabilised Nystrom approximation
    H ~ Y (Omega^T Y)^+ Y^T = U^T diag(l) U (Tropp et al. 2017) is inverted
    with the Woodbury identity, so

        (H + lambda I)^-1 v ~ U^T (diag(l) + lambda)^-1 U v + (I - U^T U) v / lambda.

    The sketch assumes H is positive semi-definite: use ``second_order="gauss_newton"``
    or ``"empirical_fisher"`` for non-convex models.

    Args:
        rank: sketch size r (<= number of parameters).
        seed: seeds Omega.
        block_structure: a block-diagonal H (:mod:`torchfluence.solvers.block_diagonal`):
            each block has its own rank-``min(rank, block size)`` sketch of its H_BB.
        (others as in :class:`~torchfluence.InfluenceFunctionModel`; ``regularization`` must be > 0)
    """

    Options = NystroemOptions
    traits = SolverTraits(solves_rows_independently=True, accepts_block_structure=True)  # a fixed map per row

    def _block_options(self, num_params: int) -> dict:
        return {"rank": min(self.rank, num_params)}


def nystroem_sketch(curvature_vp, num_params: int, rank: int, dtype: torch.dtype, device: torch.device,
                    seed: int) -> LowRankCurvature:
    """Stabilised randomized Nystrom approximation of a PSD operator (float64 result).

    Args:
        curvature_vp: (k, p) -> (k, p) products with the operator.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    omega = torch.randn(rank, num_params, generator=generator, dtype=torch.float64, device=device)
    omega, _ = torch.linalg.qr(omega.T)
    omega = omega.T  # (r, p) orthonormal rows
    y = curvature_vp(omega.to(dtype)).double()  # (r, p)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("the curvature-vector products are NaN or inf; check the model and data for overflow")
    # A shift of about the rounding level keeps the small core matrix positive definite.
    shift = (torch.finfo(dtype).eps * num_params ** 0.5) * float(torch.linalg.matrix_norm(y, ord=2))
    y_shifted = y + shift * omega
    core = omega @ y_shifted.T
    core = 0.5 * (core + core.T)
    chol, info = torch.linalg.cholesky_ex(core)
    if int(info) != 0:
        raise ValueError(
            "the Nystrom sketch found negative curvature (H is not positive semi-definite on the sketch); "
            "use second_order='gauss_newton'")
    b = torch.linalg.solve_triangular(chol, y_shifted, upper=False)  # (r, p): rows of (Y C^-T)^T
    u, s, vh = torch.linalg.svd(b, full_matrices=False)  # b = u diag(s) vh; eigenvectors are rows of vh
    eigenvalues = (s.square() - shift).clamp_min(0)
    return LowRankCurvature(vh, eigenvalues)
