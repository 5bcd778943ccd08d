"""Low-rank curvature from a Krylov subspace (block Lanczos / Arnoldi on a symmetric operator)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data import Samples
from ..checks import check_regularization
from ..contract import SolverTraits, option
from ..influence import InfluenceFunctionModel
from ..persist import state_tensor
from ._lowrank import Complement, LowRankCurvature, check_complement, check_rank
from .block_diagonal import BlockDiagonal, BlockOptions


@dataclass(frozen=True)
class ArnoldiOptions(BlockOptions):
    """ArnoldiInfluence's own options."""

    rank: int = option(fit=True, doc="eigenpairs kept")
    krylov_dimension: Optional[int] = option(fit=True, doc="Krylov space size")
    krylov_block: int = option(fit=True, doc="vectors per block Lanczos step")
    tol: float = option(fit=True, doc="Ritz residual tolerance")
    seed: int = option(fit=True, doc="seed of the start block")
    complement: str = option(doc="what the solve does off the kept subspace")


class _ArnoldiSolve(InfluenceFunctionModel):
    """:class:`ArnoldiInfluence` over all its parameters at once (its algorithm, without blocks)."""

    def __init__(self, model, loss, regularization: float = 0.0, rank: int = 10, *,
                 krylov_dimension: Optional[int] = None, krylov_block: int = 8, tol: float = 1e-4,
                 complement: Complement = "regularization", seed: int = 0, **kwargs) -> None:
        super().__init__(model, loss, regularization, **kwargs)
        check_rank(rank, self.num_params)
        check_complement(complement)
        if krylov_dimension is None:
            krylov_dimension = max(4 * rank, rank + 40)
        if not isinstance(krylov_dimension, int) or krylov_dimension < rank:
            raise ValueError(f"krylov_dimension must be an int >= rank ({rank}), got {krylov_dimension!r}")
        if not isinstance(krylov_block, int) or krylov_block < 1:
            raise ValueError(f"krylov_block must be a positive int, got {krylov_block!r}")
        if complement == "regularization" and self.regularization == 0:
            raise ValueError("complement='regularization' divides by the regularization, which is 0; pass "
                             "regularization > 0 or complement='drop'")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        self.rank, self.complement, self.seed, self.tol = rank, complement, seed, tol
        self.ritz_residual: Optional[float] = None  # worst relative residual of the kept pairs, after fit
        self.krylov_dimension = min(krylov_dimension, self.num_params)
        self.krylov_block = krylov_block
        self.low_rank: Optional[LowRankCurvature] = None

    def _fit(self, train: Samples) -> None:
        p, m = self.num_params, self.krylov_dimension
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        basis = torch.empty(0, p, dtype=torch.float64, device=self.device)  # (j, p) orthonormal rows
        products = torch.empty(0, p, dtype=torch.float64, device=self.device)  # H times each row
        block = torch.randn(min(self.krylov_block, m), p, generator=generator, dtype=torch.float64, device=self.device)
        bar = tqdm(total=m, desc="Krylov", disable=not self.progress)
        residual = float("inf")
        while basis.shape[0] < m:
            block = _orthonormal_against(block[: m - basis.shape[0]], basis, generator)
            basis = torch.cat([basis, block])
            hv = self.curvature_vp(block.to(self.dtype)).double()
            if not bool(torch.isfinite(hv).all()):
                raise ValueError("the curvature-vector products are NaN or inf; check the model and data for overflow")
            products = torch.cat([products, hv])
            block = hv
            bar.update(block.shape[0])
            if basis.shape[0] >= self.rank:
                eigenvalues, eigenvectors, residual = _ritz_pairs(basis, products, self.rank)
                bar.set_postfix(residual=f"{residual:.1e}")
                if residual <= self.tol:
                    break
        bar.close()
        self.ritz_residual = residual
        if residual > self.tol and m < p:
            warnings.warn(
                f"ArnoldiInfluence: the kept eigenpairs did not converge within krylov_dimension={m} (relative "
                f"residual {residual:.1e} > tol={self.tol:g}); raise krylov_dimension", stacklevel=3)
        self.low_rank = LowRankCurvature(eigenvectors, eigenvalues)
        self._check_invertible()
        self._typed = LowRankCurvature(eigenvectors.to(self.dtype), eigenvalues.to(self.dtype))

    def _check_invertible(self) -> None:
        smallest = float(self.low_rank.eigenvalues.min())
        if smallest + self.regularization <= 0:
            raise ValueError(
                f"a kept eigenvalue of H is {smallest:.3g}, so H + regularization * I (regularization="
                f"{self.regularization:.3g}) is singular or indefinite on the low-rank space; increase "
                "regularization or use second_order='gauss_newton'")

    def with_regularization(self, regularization: float) -> "ArnoldiInfluence":
        """Sets lambda without refitting; returns self."""
        check_regularization(regularization)
        if self.complement == "regularization" and regularization == 0:
            raise ValueError("complement='regularization' needs regularization > 0")
        self.regularization = float(regularization)
        if self.low_rank is not None:
            self._check_invertible()
        return self

    def solve(self, vectors: Tensor) -> Tensor:
        self._require_fitted()
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        return self._typed.inverse_apply(vectors, self.regularization, self.complement)

    # -- the solver contract: options and fitted state (torchfluence.contract) -----------------------
    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """The kept Ritz pairs (float64) and their residual."""
        return ({"eigenvectors": self.low_rank.eigenvectors, "eigenvalues": self.low_rank.eigenvalues},
                {"ritz_residual": self.ritz_residual})

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        vectors = state_tensor(tensors, "eigenvectors", (self.rank, self.num_params), torch.float64)
        values = state_tensor(tensors, "eigenvalues", (self.rank,), torch.float64)
        self.ritz_residual = info["ritz_residual"]
        self.low_rank = LowRankCurvature(vectors, values)
        self._check_invertible()
        self._typed = LowRankCurvature(vectors.to(self.dtype), values.to(self.dtype))


class ArnoldiInfluence(BlockDiagonal, _ArnoldiSolve):
    """Inverts the curvature on its dominant eigenspace, found by a Krylov method.

    Builds an orthonormal basis of the block Krylov space
    span{V, H V, H^2 V, ...} (``krylov_dimension`` vectors, grown
    ``krylov_block`` at a time so each pass over the training data runs one
    vmapped product for the whole block), projects H onto it (Rayleigh-Ritz,
    in float64) and keeps the ``rank`` Ritz pairs of largest magnitude
    (Schioppa et al. 2022 use the same Arnoldi idea).

    On the complement of those eigenvectors, ``complement`` decides:
    ``"regularization"`` (default) treats H as 0 there, so the inverse keeps the
    component ``(I - U^T U) v / lambda`` (the Woodbury inverse of
    U^T diag(l) U + lambda I); ``"drop"`` discards it, as pyDVL does, which
    throws away most of a gradient when rank << p. Keeping it needs
    ``regularization > 0``.

    Args:
        rank: eigenpairs kept (<= number of parameters).
        krylov_dimension: largest size of the Krylov space (default ``max(4 * rank, rank + 40)``,
            capped at the parameter count).
        krylov_block: vectors per product.
        tol: the space stops growing once every kept Ritz pair has
            ``||H u - l u|| <= tol * max |l|``; a warning says when ``krylov_dimension``
            is reached first.
        complement: ``"regularization"`` or ``"drop"``.
        seed: seeds the starting block.
        block_structure: a block-diagonal H (:mod:`torchfluence.solvers.block_diagonal`):
            each block keeps its own ``min(rank, block size)`` eigenpairs of its H_BB.
        (others as in :class:`~torchfluence.InfluenceFunctionModel`)
    """

    Options = ArnoldiOptions
    traits = SolverTraits(solves_rows_independently=True, accepts_block_structure=True)  # a fixed map per row

    def _block_options(self, num_params: int) -> dict:
        return {"rank": min(self.rank, num_params)}


def _ritz_pairs(basis: Tensor, products: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Rayleigh-Ritz on span(basis): the `rank` pairs of largest magnitude and their worst residual.

    Returns eigenvalues (rank,), eigenvectors (rank, p) and
    max_i ||H u_i - l_i u_i|| / max_i |l_i|.
    """
    projected = basis @ products.T  # Q^T H Q, (m, m)
    values, vectors = torch.linalg.eigh(0.5 * (projected + projected.T))
    keep = values.abs().argsort(descending=True)[:rank]
    values, vectors = values[keep], vectors[:, keep].T  # (rank,), (rank, m)
    eigenvectors = vectors @ basis
    residuals = (vectors @ products - values[:, None] * eigenvectors).norm(dim=1)
    return values, eigenvectors, float(residuals.max() / values.abs().max().clamp_min(1e-300))


def _orthonormal_against(block: Tensor, basis: Tensor, generator: torch.Generator) -> Tensor:
    """Rows of `block` orthonormalised against `basis` (twice, for float64-level orthogonality).

    Directions that vanish (the Krylov space became invariant) are replaced by
    random ones so the basis keeps growing.
    """
    for _attempt in range(3):
        for _ in range(2):
            if basis.shape[0]:
                block = block - (block @ basis.T) @ basis
            q, r = torch.linalg.qr(block.T)
            block = q.T
        scale = r.diagonal().abs()
        lost = scale <= 1e-10 * max(float(scale.max()), 1e-300)
        if not bool(lost.any()):
            return block
        fresh = torch.randn(int(lost.sum()), block.shape[1], generator=generator, dtype=block.dtype,
                            device=block.device)
        block = torch.cat([block[~lost], fresh])
    return block[~lost]
