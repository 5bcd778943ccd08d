"""Batched (preconditioned) conjugate gradients with batched Hessian-vector products."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..target_sampling import exact_output_grads
from ..curvature import AutogradHessian
from ..data import Samples
from ..distributed import all_reduce_sum, local_blocks
from ..checks import check_regularization
from ..contract import SolverTraits, option
from ..capture import find_layers, tied_parameters
from ..influence import InfluenceFunctionModel
from ..parameter_blocks import Ranges, column_ranges, gather_columns, scatter_columns
from ..persist import state_tensor
from ._lowrank import LowRankCurvature, check_rank
from .block_diagonal import BlockDiagonal, BlockOptions
from .kfac import EkfacInfluence, KfacInfluence
from .nystroem import nystroem_sketch

Preconditioner = Literal["jacobi", "kfac", "ekfac", "nystroem"]
_PRECONDITIONERS = (None, "jacobi", "kfac", "ekfac", "nystroem")
# Keeping every training block's gradient graph for a whole solve costs about
# (training samples x parameters) values of activations and saved tensors at
# most for the networks this is meant for; above this many it is rebuilt per product.
_REUSE_BUDGET = 1 << 26


@dataclass
class SolveInfo:
    """How the last :meth:`CgInfluence.solve` went, one entry per right-hand side.

    Attributes:
        iterations: (k,) CG iterations each column took.
        relative_residuals: (k,) final ||b - A x|| / ||b|| (A = H + lambda I).
        converged: (k,) whether each column met ``rtol``.
    """

    iterations: Tensor
    relative_residuals: Tensor
    converged: Tensor


@dataclass(frozen=True)
class CgOptions(BlockOptions):
    """CgInfluence's own options."""

    rtol: float = option(doc="relative residual at which a right-hand side has converged")
    maxiter: int = option(doc="iteration cap")
    preconditioner: Optional[str] = option(fit=True, doc="None, jacobi, nystroem, kfac or ekfac")
    preconditioner_samples: int = option(fit=True, doc="Hutchinson probes of the Jacobi diagonal")
    preconditioner_rank: int = option(fit=True, doc="rank of the Nystroem preconditioner")
    block: bool = option(doc="block CG (one Krylov space for all queries) or one CG per query")


class _CgSolve(InfluenceFunctionModel):
    """:class:`CgInfluence` over all its parameters at once (its algorithm, without blocks)."""

    def __init__(self, *args, rtol: float = 1e-6, maxiter: Optional[int] = None,
                 preconditioner: Optional[Preconditioner] = None, preconditioner_samples: int = 64,
                 preconditioner_rank: int = 32, block: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.block = bool(block)
        if not rtol > 0:
            raise ValueError(f"rtol must be > 0, got {rtol!r}")
        if maxiter is not None and maxiter < 1:
            raise ValueError(f"maxiter must be >= 1, got {maxiter!r}")
        if preconditioner not in _PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {_PRECONDITIONERS}, got {preconditioner!r}")
        if preconditioner == "nystroem":
            check_rank(preconditioner_rank, self.num_params, "preconditioner_rank")
        self.rtol, self.maxiter = rtol, maxiter
        self.preconditioner, self.preconditioner_samples = preconditioner, preconditioner_samples
        self._check_preconditioner_regularization(self.regularization)
        self.preconditioner_rank = preconditioner_rank
        self.diagonal: Optional[Tensor] = None  # (p,) estimate of diag(H), with "jacobi"
        self._kfac: Optional[KfacInfluence] = None  # with "kfac" / "ekfac"
        self._kfac_columns: Optional[Ranges] = None  # its columns, when it covers only some parameters
        self._sketch: Optional[LowRankCurvature] = None  # with "nystroem"
        if preconditioner in ("kfac", "ekfac"):
            self._kfac = self._make_kfac("true")  # checks the layers now; refitted at fit
        self.last_solve_info: Optional[SolveInfo] = None

    def _fit(self, train: Samples) -> None:
        if self.preconditioner == "jacobi":
            generator = torch.Generator(device=self.device).manual_seed(0)  # same probes in every process
            probes = torch.randint(0, 2, (self.preconditioner_samples, self.num_params), device=self.device,
                                   generator=generator)
            probes = probes.to(self.dtype) * 2 - 1
            self.diagonal = (probes * self.curvature_vp(probes)).mean(dim=0)
        elif self._kfac is not None:
            # A preconditioner must not be noisy: take the Fisher's expectation in closed
            # form where the loss allows (cross-entropy or MSE on (n, C) outputs).
            x = train.first_block().x
            with torch.no_grad():
                outputs = self.functions.outputs(self.functions.theta, self.functions.cast_input(x[:2]))
            exact = exact_output_grads(self.functions.loss, outputs) is not None
            self._kfac = self._make_kfac("exact" if exact else "true")
            self._kfac.fit_samples(train)
        elif self.preconditioner == "nystroem":
            self._sketch = nystroem_sketch(self.curvature_vp, self.num_params, self.preconditioner_rank,
                                           self.dtype, self.device, seed=0)
            self._sketch = LowRankCurvature(self._sketch.eigenvectors.to(self.dtype),
                                            self._sketch.eigenvalues.to(self.dtype))

    def _check_preconditioner_regularization(self, regularization: float) -> None:
        if self.preconditioner in ("kfac", "ekfac", "nystroem") and regularization <= 0:
            raise ValueError(f"preconditioner={self.preconditioner!r} needs regularization > 0 (its inverse "
                             f"divides by it), got {regularization!r}")

    def with_regularization(self, regularization: float) -> "CgInfluence":
        """Sets lambda without refitting (an (E)K-FAC preconditioner follows it); returns self."""
        value = check_regularization(regularization)
        self._check_preconditioner_regularization(value)
        self.regularization = value
        if self._kfac is not None:
            self._kfac.with_regularization(value)
        return self

    def _make_kfac(self, fisher: str) -> KfacInfluence:
        f = self.functions
        cls = EkfacInfluence if self.preconditioner == "ekfac" else KfacInfluence
        params, self._kfac_columns = f.names, None
        if self.projector is None:
            layers, missing = find_layers(f)
            left_out = set(missing) | set(tied_parameters(f, layers))  # what K-FAC's own default leaves out
            covered = [name for name in f.names if name not in left_out]
            if left_out and covered:  # the rest get 1 / lambda in _apply_preconditioner
                params = covered
                self._kfac_columns = column_ranges(f.names, f.sizes, {"kfac": covered})["kfac"]
        # Monte Carlo draws only where no closed form exists; four keep the noise low.
        return cls(f.model, f.loss, self.regularization, params=params, dtype=f.dtype, block_size=self.block_size,
                   progress=self.progress, fisher=fisher, fisher_samples=1 if fisher == "exact" else 4,
                   projector=self.projector)  # in the same (projected) space as the solve

    def _apply_preconditioner(self, r: Tensor) -> Tensor:
        if self._kfac is not None:
            if self._kfac_columns is None:
                return self._kfac.solve(r)
            out = r / self.regularization
            scatter_columns(out, self._kfac_columns, self._kfac.solve(gather_columns(r, self._kfac_columns)))
            return out
        if self._sketch is not None:
            return self._sketch.preconditioner_apply(r, self.regularization)
        if self.diagonal is None:
            return r
        # Hutchinson estimates can dip below zero; keep the preconditioner positive.
        scale = self.diagonal.abs().clamp_min(1e-8 * float(self.diagonal.abs().max())) + self.regularization
        return r / scale

    def solve(self, vectors: Tensor) -> Tensor:
        self._require_fitted()
        if self.block:
            return self._solve_block(vectors.to(device=self.device, dtype=self.dtype))
        return self._solve_independent(vectors.to(device=self.device, dtype=self.dtype))

    def _training_curvature(self) -> Callable[[Tensor], Tensor]:
        """``vectors (k, p) -> H vectors`` over the training data, for the iterations of one solve.

        Every iteration multiplies the same H, so with the exact Hessian (reverse
        route) each training block's forward pass and gradient graph are built at
        the first product and reused by the later ones, which then run only the
        double backward. The chunks are planned for the first product's vectors;
        deflation only lowers the count after that. Used when the local training samples x parameters fit
        ``_REUSE_BUDGET`` (a shape rule); otherwise, and for other operators,
        :meth:`curvature_vp` itself.
        """
        data = self._require_fitted()
        operator = self.curvature_operator
        if (type(operator) is not AutogradHessian or self.functions.hvp_route != "reverse"
                or data.count() * self.num_params > _REUSE_BUDGET):
            return self.curvature_vp
        n = data.count()
        cached: list[tuple[float, Callable[[Tensor], Tensor]]] = []

        def product(vectors: Tensor) -> Tensor:
            if not cached:
                for block in local_blocks(data):
                    cached.append((block.size / n, operator.reusable(block.x, block.y, vectors.shape[0])))
            total = torch.zeros_like(vectors)
            for weight, block_vp in cached:
                total += weight * block_vp(vectors)
            return all_reduce_sum(total)

        return product

    def _solve_block(self, b: Tensor) -> Tensor:
        """Breakdown-free block CG; rows of `b` (k, p) are the right-hand sides."""
        k = b.shape[0]
        maxiter = self.maxiter or self.num_params
        curvature = self._training_curvature()  # local: its kept graphs go with the solve
        x = torch.zeros_like(b)
        r = b.clone()
        b_norm = b.norm(dim=1)
        residual = _relative(r, b_norm)
        iterations = torch.zeros(k, dtype=torch.int64, device=b.device)
        active = residual > self.rtol
        directions = _orthonormal_rows(self._apply_preconditioner(r[active]))
        bar = tqdm(total=maxiter, desc="block cg", disable=not self.progress)
        stalled = ""
        for _ in range(maxiter):
            if not bool(active.any()) or directions.shape[0] == 0:
                break
            products = curvature(directions) + self.regularization * directions  # A P, (m, p)
            # Cholesky of P A P^T (float64); directions dependent in the A-inner product are dropped.
            directions, products, gram = _spd_factor(directions, products, self.regularization)
            if directions.shape[0] == 0:
                stalled = ("every search direction was numerically dependent on the others in the "
                           "A-inner product (A = H + lambda I), so block CG could not go on")
                break
            index = active.nonzero().flatten()
            # alpha = (P A P^T)^-1 P R^T for the active columns.
            alpha = torch.cholesky_solve((directions.double() @ r[index].double().T), gram).to(b.dtype)
            x[index] += alpha.T @ directions
            r[index] -= alpha.T @ products
            iterations[index] += 1
            residual[index] = _relative(r[index], b_norm[index])
            active = residual > self.rtol
            bar.update(1)
            bar.set_postfix(active=int(active.sum()), block=directions.shape[0],
                            max_residual=f"{float(residual.max()):.2e}")
            if not bool(active.any()):
                break
            z = self._apply_preconditioner(r[active])
            # New directions A-conjugate to the current block: Z - P^T (P A P^T)^-1 (A P) Z^T.
            beta = torch.cholesky_solve(products.double() @ z.double().T, gram).to(b.dtype)
            directions = _orthonormal_rows(z - beta.T @ directions)
        bar.close()
        self._record(iterations, residual, k, maxiter, stalled)
        return x

    def _record(self, iterations: Tensor, residual: Tensor, k: int, maxiter: int, stalled: str = "") -> None:
        converged = residual <= self.rtol
        self.last_solve_info = SolveInfo(iterations.cpu(), residual.cpu(), converged.cpu())
        if not bool(converged.all()):
            why = (f"it stopped early: {stalled}" if stalled else f"within maxiter={maxiter}")
            warnings.warn(
                f"CG did not converge for {int((~converged).sum())} of {k} right-hand sides {why} "
                f"(largest relative residual {float(residual.max()):.2e}, rtol={self.rtol:g}); "
                "see last_solve_info, raise maxiter or regularization", stacklevel=3)

    def _solve_independent(self, b: Tensor) -> Tensor:
        k = b.shape[0]
        maxiter = self.maxiter or self.num_params
        hessian_vp = self._training_curvature()
        x = torch.zeros_like(b)
        r = b.clone()
        z = self._apply_preconditioner(r)
        d = z.clone()
        rz = (r * z).sum(dim=1)
        b_norm = b.norm(dim=1)
        residual = _relative(r, b_norm)
        iterations = torch.zeros(k, dtype=torch.int64, device=b.device)
        active = (residual > self.rtol).nonzero().flatten()
        stalled = ""
        bar = tqdm(total=maxiter, desc="cg", disable=not self.progress)
        for _ in range(maxiter):
            if active.numel() == 0:
                break
            da = d[active]
            ad = hessian_vp(da) + self.regularization * da
            curvature = (da * ad).sum(dim=1)
            # d^T A d within rounding of zero says nothing about A: that column cannot go on (its
            # direction is dependent in the A-inner product) and stops; only a clearly negative
            # value shows negative curvature. Rounding scale as in _spd_factor, for one direction.
            level = _rounding_level(da.dtype, 1) * da.norm(dim=1) * ad.norm(dim=1)
            negative = curvature < -level
            if bool(negative.any()):
                i = int(negative.nonzero()[0])
                _refuse(float(curvature[i] / da[i].double().norm() ** 2), self.regularization)
            stuck = curvature <= level
            if bool(stuck.any()):
                stalled = ("a search direction had curvature within rounding of zero (dependent in the "
                           "A-inner product, A = H + lambda I), so its column stopped")
                keep = ~stuck
                active, da, ad, curvature = active[keep], da[keep], ad[keep], curvature[keep]
                if active.numel() == 0:
                    break
            alpha = rz[active] / curvature
            x[active] += alpha[:, None] * da
            r[active] -= alpha[:, None] * ad
            iterations[active] += 1
            residual[active] = r[active].norm(dim=1) / b_norm[active]
            z_active = self._apply_preconditioner(r[active])
            rz_new = (r[active] * z_active).sum(dim=1)
            d[active] = z_active + (rz_new / rz[active])[:, None] * da
            rz[active] = rz_new
            active = active[residual[active] > self.rtol]
            bar.update(1)
            bar.set_postfix(active=int(active.numel()), max_residual=f"{float(residual.max()):.2e}")
        bar.close()
        self._record(iterations, residual, k, maxiter, stalled)
        return x

    # -- the solver contract: options and fitted state (torchfluence.contract) -----------------------
    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """The preconditioner's state: the Jacobi diagonal, the Nystrom sketch, or the (E)K-FAC factors."""
        if self.diagonal is not None:
            return {"diagonal": self.diagonal}, {}
        if self._sketch is not None:
            return {"sketch/eigenvectors": self._sketch.eigenvectors, "sketch/eigenvalues": self._sketch.eigenvalues}, {}
        if self.preconditioner in ("kfac", "ekfac"):
            tensors, info = self._kfac.fitted_state()
            return ({f"preconditioner/{key}": value for key, value in tensors.items()},
                    {"fisher": self._kfac.fisher, "preconditioner": info})
        return {}, {}

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        p = self.num_params
        if self.preconditioner == "jacobi":
            self.diagonal = state_tensor(tensors, "diagonal", (p,), self.dtype)
        elif self.preconditioner == "nystroem":
            self._sketch = LowRankCurvature(
                state_tensor(tensors, "sketch/eigenvectors", (self.preconditioner_rank, p), self.dtype),
                state_tensor(tensors, "sketch/eigenvalues", (self.preconditioner_rank,), self.dtype))
        elif self.preconditioner in ("kfac", "ekfac"):
            self._kfac = self._make_kfac(info["fisher"])
            prefix = "preconditioner/"
            self._kfac.restore({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)},
                    info["preconditioner"], n_train=self.n_train, classes=self._classes, train=self._train)


class CgInfluence(BlockDiagonal, _CgSolve):
    """Solves (H + lambda I) x = b by conjugate gradients, all right-hand sides at once.

    With ``block=True`` (the default) the right-hand sides share one Krylov
    space: block CG (O'Leary 1980) in its breakdown-free form (Ji & Li 2017),
    whose search block is re-orthonormalised every iteration with a
    rank-revealing step that drops directions which became dependent, so the
    block shrinks instead of breaking down; directions that are still dependent
    in the A-inner product (their P A P^T singular to rounding) are deflated
    the same way, and only curvature negative beyond rounding is refused. Every direction found for one
    column helps all others, which cuts the iterations several-fold when there
    are many right-hand sides. ``block=False`` runs independent CG per column
    (the same vmapped product per iteration, one Krylov space per column).

    Either way each iteration is one pass over the training data with a single
    vmapped curvature product for the whole block. Each column stops on its own
    relative residual ``||r|| <= rtol * ||b||``; the counts and final residuals
    are in :attr:`last_solve_info`, and a warning says when some column hit
    ``maxiter`` first.

    Args:
        rtol: relative residual at which a column stops.
        maxiter: iteration cap (default: the number of parameters, where exact
            arithmetic would have converged).
        preconditioner: None, or one of
            ``"jacobi"``: divide by diag(H) + lambda, with the diagonal estimated at
            fit by Hutchinson's method from ``preconditioner_samples`` Rademacher probes;
            ``"ekfac"`` / ``"kfac"``: apply the (E)K-FAC inverse (fitted at fit time,
            same regularization, with the exact Fisher expectation where the loss
            allows), which captures most of the spectrum of networks made of
            Linear/Conv2d layers, so fewer iterations reach the exact solve; parameters
            outside captured layers (normalisation layers, bare parameters) get
            1 / lambda there, the regularization's own inverse;
            ``"nystroem"``: a rank-``preconditioner_rank`` Nystrom sketch of H
            (Frangella, Tropp & Udell 2023), for positive semi-definite curvature.
        preconditioner_rank: sketch size for ``"nystroem"``.
        block: one shared Krylov space (block CG) rather than one per column.
        block_structure: a block-diagonal H (:mod:`torchfluence.solvers.block_diagonal`):
            each block is solved by its own CG (its own preconditioner, fitted on that
            block, and its own iteration count); see :attr:`block_solvers`.
        (others as in :class:`~torchfluence.InfluenceFunctionModel`)
    """

    Options = CgOptions
    # Every iteration is a pass over the training data.
    traits = SolverTraits(solve_reads_train_data=True, accepts_block_structure=True)


def _relative(r: Tensor, b_norm: Tensor) -> Tensor:
    """||r_j|| / ||b_j|| per row (0 where b_j = 0)."""
    return torch.where(b_norm > 0, r.norm(dim=1) / b_norm.clamp_min(1e-300), torch.zeros_like(b_norm))


def _orthonormal_rows(w: Tensor) -> Tensor:
    """An orthonormal basis of the rows of `w` (a, p), dropping numerically dependent directions.

    Rows are first scaled to unit length, so that a nearly converged column's
    small residual counts as much as a large one. Then, rank-revealing through
    the eigendecomposition of the float64 Gram matrix, directions whose
    singular value is below ``sqrt(eps)`` of the largest (eps of the working
    dtype) are dropped: they are rounding noise, not new information. A
    second pass makes the rows orthonormal to working precision; its Gram
    matrix is the identity up to float64 rounding amplified by the kept
    condition number (< 1/sqrt(eps)), so a Cholesky factor does it at a
    fraction of an eigendecomposition's cost (CholeskyQR2), with the
    eigendecomposition as the fallback should that factor fail.
    """
    eps = torch.finfo(w.dtype).eps
    w = w.double()
    norms = w.norm(dim=1)
    w = w[norms > 0] / norms[norms > 0, None]
    if w.shape[0] == 0:
        return w.to(_working(eps))
    w = _eigen_orthonormal(w, eps)
    factor, info = torch.linalg.cholesky_ex(w @ w.T)
    if int(info) == 0:
        w = torch.linalg.solve_triangular(factor, w, upper=False)
    else:
        w = _eigen_orthonormal(w, eps)
    return w.to(_working(eps))


def _eigen_orthonormal(w: Tensor, eps: float) -> Tensor:
    """Rows spanning those of `w` (a, p), float64, orthonormal, with directions below sqrt(eps) dropped."""
    values, vectors = torch.linalg.eigh(w @ w.T)
    keep = values > max(float(values[-1]), 1e-300) * eps
    return (vectors[:, keep] / values[keep].sqrt()).T @ w


def _working(eps: float) -> torch.dtype:
    return torch.float64 if eps < 1e-10 else torch.float32


def _rounding_level(dtype: torch.dtype, m: int) -> float:
    """Relative size of the rounding error in an m x m block P A P^T whose products A P are in `dtype`.

    Each product row A p_j carries a relative error of a few eps of the working dtype (more
    in float32, whose curvature products accumulate over the data and the network), and the
    block's spectral norm collects up to m such rows: 16 * m * eps. For float32 and a block
    of 10 that is 2e-5 of the largest eigenvalue, far below any curvature a regularization
    makes meaningful and far above float64's rounding of the gram itself.
    """
    return 16.0 * m * torch.finfo(dtype).eps


def _refuse(rayleigh: float, regularization: float) -> None:
    raise ValueError(
        f"CG met a direction of negative curvature: its Rayleigh quotient p^T (H + lambda I) p / p^T p is "
        f"{rayleigh:.3g}, beyond rounding, so H + regularization * I is not positive definite "
        f"(regularization={regularization:.3g}); increase regularization or use second_order='gauss_newton'")


def _spd_factor(directions: Tensor, products: Tensor, regularization: float) -> tuple[Tensor, Tensor, Tensor]:
    """The block's directions and products, and the Cholesky factor (float64) of P A P^T.

    When the Cholesky factorization fails, the block is deflated instead of refused: the
    gram's eigenvalues at or below the rounding level (:func:`_rounding_level` times the
    largest) belong to directions numerically dependent in the A-inner product, which are
    dropped; the kept ones are rotated onto the gram's eigenvectors, so their gram is
    diagonal. An eigenvalue below minus that level is negative curvature: refused, with its
    Rayleigh quotient. No direction left: an empty block (the caller stops).

    Args:
        directions: (m, p) search directions P.
        products: (m, p) A P.
    """
    gram = directions.double() @ products.double().T
    gram = 0.5 * (gram + gram.T)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return directions, products, factor
    values, vectors = torch.linalg.eigh(gram)
    level = _rounding_level(products.dtype, gram.shape[0]) * max(float(values.abs().max()), 1e-300)
    if float(values[0]) < -level:
        rotated = vectors[:, 0] @ directions.double()
        _refuse(float(values[0]) / float(rotated @ rotated), regularization)
    keep = values > level
    vectors = vectors[:, keep]
    directions = (vectors.T @ directions.double()).to(directions.dtype)
    products = (vectors.T @ products.double()).to(products.dtype)
    return directions, products, torch.diag(values[keep].sqrt())
