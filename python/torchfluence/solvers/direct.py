"""Exact solves with the explicit curvature matrix, eigendecomposed once."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checks import check_regularization
from ..data import Samples
from ..influence import InfluenceFunctionModel


class DirectInfluence(InfluenceFunctionModel):
    """Builds H (or the Gauss-Newton matrix) explicitly and eigendecomposes it at fit.

    Needs p x p memory, so it suits up to a few thousand parameters; it is the
    exact reference the iterative solvers are judged against. Because H is kept
    as Q diag(eigenvalues) Q^T (in float64), :meth:`with_regularization` changes
    lambda without refitting.

    The matrix comes from whichever route is cheaper for the shapes: batched
    curvature-vector products against identity columns (p products per sample),
    or, for ``second_order="gauss_newton"`` with fewer outputs c than parameters,
    per-sample output Jacobians (c backward passes per sample, then J^T H_out J).

    Args:
        column_block: identity columns pushed through one vmapped product.
        (others as in :class:`~torchfluence.InfluenceFunctionModel`)
    """

    def __init__(self, *args, column_block: int = 512, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.column_block = column_block
        self.eigenvalues: Tensor | None = None  # (p,) float64, ascending
        self.eigenvectors: Tensor | None = None  # (p, p) float64, columns

    @property
    def curvature(self) -> Tensor:
        """The fitted H (without regularization), (p, p) float64."""
        self._require_fitted()
        return (self.eigenvectors * self.eigenvalues) @ self.eigenvectors.T

    def _fit(self, train: Samples) -> None:
        matrix = self._explicit_curvature(train)
        matrix = 0.5 * (matrix + matrix.T)  # symmetric up to rounding; eigh wants it exactly
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(matrix)
        self._check_positive_definite()

    def with_regularization(self, regularization: float) -> "DirectInfluence":
        """Sets lambda without refitting; returns self."""
        self.regularization = check_regularization(regularization)
        if self.eigenvalues is not None:
            self._check_positive_definite()
        return self

    def solve(self, vectors: Tensor) -> Tensor:
        self._require_fitted()
        q = self.eigenvectors
        coeffs = (vectors.to(q.dtype) @ q) / (self.eigenvalues + self.regularization)
        return (coeffs @ q.T).to(self.dtype)

    def _check_positive_definite(self) -> None:
        smallest = float(self.eigenvalues[0])
        largest = float(self.eigenvalues[-1].abs())
        # Eigenvalues within rounding of zero count as zero: a float32-built matrix
        # is only known to about 1e-6 of its largest eigenvalue.
        tolerance = largest * (1e-12 if self.dtype == torch.float64 else 1e-6)
        if smallest + self.regularization <= tolerance:
            suggestion = max(-smallest, 0.0) + max(tolerance, 1e-3 * largest)
            raise ValueError(
                f"H + regularization * I is not positive definite: the smallest eigenvalue of H is "
                f"{smallest:.3g} and regularization is {self.regularization:.3g}. Use a regularization of at "
                f"least {suggestion:.2g} (or second_order='gauss_newton', which is positive semi-definite "
                f"for convex losses)")

    def _explicit_curvature(self, train: Samples) -> Tensor:
        p = self.num_params
        use_jacobians = self.second_order == "gauss_newton" and self._outputs_per_sample(train) < p
        matrix = torch.zeros(p, p, dtype=torch.float64, device=self.device)
        eye = torch.eye(p, dtype=self.dtype, device=self.device)
        for block in tqdm(train.blocks(), desc="curvature", disable=not self.progress):
            if use_jacobians:
                jac = self.functions.output_jacobians(block.x).double()  # (b, c, p)
                h_out = self.functions.output_loss_hessians(block.x, block.y).double()  # (b, c, c)
                matrix += torch.einsum("bcp,bcd,bdq->pq", jac, h_out, jac) / self.n_train
                continue
            weight = block.size / self.n_train
            for start in range(0, p, self.column_block):
                cols = eye[start:start + self.column_block]
                matrix[:, start:start + cols.shape[0]] += weight * self.curvature_operator.batch_vp(cols, block.x,
                                                                                          block.y).double().T
        return matrix

    def _outputs_per_sample(self, train: Samples) -> int:
        x = train.first_block().x
        with torch.no_grad():
            out = self.functions.outputs(self.functions.theta, self.functions.cast_input(x[:1]))
        return out[0].numel()
