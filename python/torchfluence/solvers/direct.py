"""Exact solves with the explicit curvature matrix, eigendecomposed once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checks import check_regularization
from ..data import Samples
from ..distributed import all_reduce_sum, local_blocks
from ..contract import SolverTraits, option
from ..influence import InfluenceFunctionModel
from ..persist import state_tensor
from .block_diagonal import BlockDiagonal, BlockOptions


@dataclass(frozen=True)
class DirectOptions(BlockOptions):
    """DirectInfluence's own options."""

    column_block: Optional[int] = option(doc="columns of H built per pass over the data")


class _DirectSolve(InfluenceFunctionModel):
    """:class:`DirectInfluence` over all its parameters at once (its algorithm, without blocks)."""

    def __init__(self, *args, column_block: Optional[int] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if column_block is not None and (isinstance(column_block, bool) or not isinstance(column_block, int)
                                         or column_block < 1):
            raise ValueError(f"column_block must be a positive int or None, got {column_block!r}")
        self.column_block = column_block
        self._matrix: Tensor | None = None  # (p, p) float64 H
        self._factor: Tensor | None = None  # Cholesky factor of H + lambda I
        self._eigen: tuple[Tensor, Tensor] | None = None

    @property
    def curvature(self) -> Tensor:
        """The fitted H (without regularization), (p, p) float64."""
        self._require_fitted()
        return self._matrix

    @property
    def eigenvalues(self) -> Tensor:
        """(p,) float64 eigenvalues of H, ascending."""
        return self._eigendecomposition()[0]

    @property
    def eigenvectors(self) -> Tensor:
        """(p, p) float64 eigenvectors of H, as columns."""
        return self._eigendecomposition()[1]

    def _eigendecomposition(self) -> tuple[Tensor, Tensor]:
        self._require_fitted()
        if self._eigen is None:
            self._eigen = torch.linalg.eigh(self.curvature)
        return self._eigen

    def _fit(self, train: Samples) -> None:
        matrix = self._explicit_curvature(train)
        self._matrix = 0.5 * (matrix + matrix.T)  # symmetric up to rounding
        self._eigen = None
        self._largest = _largest_magnitude(self._matrix)
        self._factorize()

    def with_regularization(self, regularization: float) -> "DirectInfluence":
        """Sets lambda without refitting; returns self."""
        self.regularization = check_regularization(regularization)
        if self._matrix is not None:
            self._factorize()
        return self

    def solve(self, vectors: Tensor) -> Tensor:
        self._require_fitted()
        solved = torch.cholesky_solve(vectors.to(device=self.device, dtype=torch.float64).T, self._factor)
        return solved.T.to(self.dtype)

    def _factorize(self) -> None:
        """Cholesky of H + lambda I, refusing a matrix that is not positive definite beyond rounding.

        Eigenvalues within rounding of zero count as zero: a float32-built matrix is
        only known to about 1e-6 of its largest eigenvalue. H + lambda I passes when
        H + (lambda - tolerance) I still has a Cholesky factor, which is the same as
        ``smallest eigenvalue + lambda > tolerance`` without an eigendecomposition.
        """
        eye = torch.eye(self._matrix.shape[0], dtype=torch.float64, device=self._matrix.device)
        tolerance = self._largest * (1e-12 if self.dtype == torch.float64 else 1e-6)
        _, info = torch.linalg.cholesky_ex(self._matrix + (self.regularization - tolerance) * eye)
        factor, info_exact = torch.linalg.cholesky_ex(self._matrix + self.regularization * eye)
        if int(info) != 0 or int(info_exact) != 0:
            smallest = float(self.eigenvalues[0])
            suggestion = max(-smallest, 0.0) + max(tolerance, 1e-3 * self._largest)
            raise ValueError(
                f"H + regularization * I is not positive definite: the smallest eigenvalue of H is "
                f"{smallest:.3g} and regularization is {self.regularization:.3g}. Use a regularization of at "
                f"least {suggestion:.2g} (or second_order='gauss_newton', which is positive semi-definite "
                f"for convex losses)")
        self._factor = factor

    def _explicit_curvature(self, train: Samples) -> Tensor:
        p = self.num_params
        use_jacobians = self.second_order == "gauss_newton" and self._outputs_per_sample(train) < p
        matrix = torch.zeros(p, p, dtype=torch.float64, device=self.device)
        eye = torch.eye(p, dtype=self.dtype, device=self.device)
        for block in tqdm(local_blocks(train), desc="curvature", disable=not self.progress):
            if use_jacobians:
                jac = self.functions.output_jacobians(block.x)  # (b, c, p), computation dtype
                h_out = self.functions.output_loss_hessians(block.x, block.y)  # (b, c, c)
                # One (p x bc) @ (bc x p) GEMM in the computation dtype per block, summed in float64.
                p_ = jac.shape[2]
                product = jac.reshape(-1, p_).T @ torch.bmm(h_out, jac).reshape(-1, p_)
                matrix += product.double() / self.n_train
                continue
            weight = block.size / self.n_train
            step = self.column_block or p
            for start in range(0, p, step):
                cols = eye[start:start + step]
                matrix[:, start:start + cols.shape[0]] += weight * self.curvature_operator.batch_vp(cols, block.x,
                                                                                          block.y).double().T
        return all_reduce_sum(matrix)

    def _outputs_per_sample(self, train: Samples) -> int:
        x = train.first_block().x
        with torch.no_grad():
            out = self.functions.outputs(self.functions.theta, self.functions.cast_input(x[:1]))
        return out[0].numel()

    # -- the solver contract: options and fitted state (torchfluence.contract) -----------------------
    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """H and the Cholesky factor of H + lambda I, with the lambda of that factor."""
        return ({"curvature": self._matrix, "cholesky": self._factor},
                {"largest": self._largest, "regularization": self.regularization})

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        p = self.num_params
        self._matrix = state_tensor(tensors, "curvature", (p, p), torch.float64)
        self._eigen = None
        self._largest = float(info["largest"])
        if self.regularization == info["regularization"]:
            self._factor = state_tensor(tensors, "cholesky", (p, p), torch.float64)
        else:  # another lambda: one new factorisation of the saved H
            self._factorize()


class DirectInfluence(BlockDiagonal, _DirectSolve):
    """Builds H (or the Gauss-Newton matrix) explicitly and factors H + lambda I at fit.

    Needs p x p memory, so it suits up to a few thousand parameters; it is the
    exact reference the iterative solvers are judged against. H is kept in
    float64 and solved through the Cholesky factor of H + lambda I;
    :meth:`with_regularization` changes lambda without refitting (one new
    factorisation), and :attr:`eigenvalues` / :attr:`eigenvectors` are computed
    on first access only.

    The matrix comes from whichever route is cheaper for the shapes: batched
    curvature-vector products against identity columns (p products per sample),
    or, for ``second_order="gauss_newton"`` with fewer outputs c than parameters,
    per-sample output Jacobians (c backward passes per sample, then J^T H_out J).

    Args:
        column_block: identity columns per curvature product; None (default): all p,
            each product then split into chunks sized by the shapes
            (:mod:`torchfluence.chunking`).
        block_structure: a block-diagonal H (:mod:`torchfluence.solvers.block_diagonal`):
            each block's H_BB is built and factored on its own (p_B x p_B memory each);
            :attr:`curvature` assembles the (p, p) block-diagonal matrix, zero between
            blocks, when it is first read.
        (others as in :class:`~torchfluence.InfluenceFunctionModel`)
    """

    Options = DirectOptions
    traits = SolverTraits(solves_rows_independently=True, accepts_block_structure=True)  # a fixed map per row

    def _after_block_fit(self) -> None:
        self._matrix, self._eigen = None, None  # assembled from the blocks' when first read

    @property
    def curvature(self) -> Tensor:
        """The fitted H (without regularization), (p, p) float64; with blocks, zero between blocks."""
        if self.blocks is not None and self._matrix is None:
            self._require_fitted()
            p = self.num_params
            matrix = torch.zeros(p, p, dtype=torch.float64, device=self.device)
            for name, solver in self.block_solvers.items():
                index = torch.cat([torch.arange(a, b, device=self.device) for a, b in self.block_columns[name]])
                matrix[index[:, None], index] = solver.curvature
            self._matrix = matrix
        return super().curvature


def _largest_magnitude(matrix: Tensor, iterations: int = 50) -> float:
    """|largest eigenvalue| of a symmetric matrix by power iteration (a lower bound, close after 50 steps)."""
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    v = torch.randn(matrix.shape[0], dtype=matrix.dtype, device=matrix.device, generator=generator)
    value = 0.0
    for _ in range(iterations):
        w = matrix @ v
        value = float(w.norm())
        if value == 0:
            return 0.0
        v = w / value
    return value
