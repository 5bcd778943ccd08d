"""pyDVL-compatible influence classes: code written against ``pydvl.influence.torch`` 0.10 runs on torchfluence.

Replace ``from pydvl.influence.torch import CgInfluence, ...`` (and the enums and
preconditioners) with ``from torchfluence.pydvl import ...``. The classes take
pyDVL's constructor arguments with pyDVL's meaning and expose its methods
(``fit``, ``influences``, ``influence_factors``, ``influences_from_factors``,
``with_regularization``) and properties (``is_fitted``, ``n_parameters``,
``is_thread_safe``, ``model``, ``loss``). Each is a subclass of the torchfluence
solver of the same name, so everything torchfluence adds (``top_k``,
``self_influences``, ``influences(..., out=path)``, ...) is available too.

Influences follow pyDVL's sign: ``grad L(z_test)^T (H + lambda I)^-1 grad L(z)``
for ``mode="up"``.

An argument whose pyDVL meaning torchfluence does not reproduce raises
:class:`NotImplementedError` (or :class:`ValueError` for a bad value) naming the
argument; none is ignored. Not supported: block-diagonal ``block_structure``
(layer-wise, parameter-wise or a custom dict), per-block ``regularization``
dicts, Arnoldi's ``max_iter`` (ARPACK restarts), preconditioners other than
:class:`JacobiPreconditioner` and :class:`NystroemPreconditioner`, and
``InverseHarmonicMeanInfluence``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from enum import Enum
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import solvers as _solvers
from .checks import check_regularization
from .curvature import CurvatureOperator

__all__ = [
    "ArnoldiInfluence",
    "BlockMode",
    "CgInfluence",
    "DirectInfluence",
    "EkfacInfluence",
    "EmpiricalFisher",
    "InfluenceMode",
    "JacobiPreconditioner",
    "LissaInfluence",
    "NystroemPreconditioner",
    "NystroemSketchInfluence",
    "Preconditioner",
    "SecondOrderMode",
]


# -- enums --------------------------------------------------------------------------------------------
class InfluenceMode(str, Enum):
    """How a training point is changed: ``Up`` (up-weighted) or ``Perturbation`` (its input perturbed)."""

    Up = "up"
    Perturbation = "perturbation"


class SecondOrderMode(Enum):
    """The curvature matrix.

    ``HESSIAN``: the Hessian of the mean training loss. ``GAUSS_NEWTON``: the mean
    of per-sample gradient outer products, (1/n) sum_i g_i g_i^T (the empirical
    Fisher; see :class:`EmpiricalFisher`). This is *not* torchfluence's
    ``second_order="gauss_newton"``, which is the generalised Gauss-Newton matrix
    J^T H_out J.
    """

    HESSIAN = "hessian"
    GAUSS_NEWTON = "gauss_newton"


class BlockMode(Enum):
    """How parameters are grouped into blocks of a block-diagonal curvature; only ``FULL`` (one block) is supported."""

    LAYER_WISE = "layer_wise"
    PARAMETER_WISE = "parameter_wise"
    FULL = "full"


def _enum_value(value: Any) -> Any:
    """The value of an Enum member (of this module's enums or pyDVL's own), else `value`."""
    return value.value if isinstance(value, Enum) else value


def _mode(mode: Any) -> str:
    value = _enum_value(mode)
    if value not in ("up", "perturbation"):
        raise ValueError(f"mode must be InfluenceMode.Up / 'up' or InfluenceMode.Perturbation / 'perturbation', "
                         f"got {mode!r}")
    return value


# -- curvature ----------------------------------------------------------------------------------------
class EmpiricalFisher(CurvatureOperator):
    """pyDVL's ``SecondOrderMode.GAUSS_NEWTON``: the mean of per-sample gradient outer products.

    For a batch with per-sample loss gradients G (b, p), the product with each row
    of V (k, p) is ``(V G^T) G / b``; over the training data this is
    ``(1/n) sum_i g_i g_i^T`` (the empirical Fisher), positive semi-definite for
    any loss. It differs from torchfluence's ``second_order="gauss_newton"``,
    the generalised Gauss-Newton matrix J^T H_out J, except where the two coincide
    (e.g. the loss's output Hessian equals its output-gradient outer product).
    """

    def batch_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        grads = self.functions.per_sample_grads(x, y).to(vectors.dtype)  # (b, p)
        return (vectors @ grads.T) @ grads / grads.shape[0]


def _second_order(second_order_mode: Any) -> dict:
    """torchfluence keyword arguments for a pyDVL ``second_order_mode``."""
    value = _enum_value(second_order_mode)
    if value == "hessian":
        return {"second_order": "hessian"}
    if value == "gauss_newton":
        return {"second_order": "hessian", "curvature": EmpiricalFisher}
    raise ValueError(f"second_order_mode must be SecondOrderMode.HESSIAN or SecondOrderMode.GAUSS_NEWTON, "
                     f"got {second_order_mode!r}")


def _check_block_structure(block_structure: Any) -> None:
    if isinstance(block_structure, Mapping):
        raise NotImplementedError(
            "block_structure: a custom block structure (a dict of block name -> parameter names) is not supported; "
            "torchfluence uses the full curvature (BlockMode.FULL). To restrict the influence to some parameters, "
            "use the native torchfluence classes with params=[...]")
    value = _enum_value(block_structure)
    if value == "full":
        return
    if value in ("layer_wise", "parameter_wise"):
        raise NotImplementedError(
            f"block_structure={block_structure!r}: block-diagonal curvature is not supported; only BlockMode.FULL "
            "(one block with all parameters). For a layer-wise block-diagonal approximation use EkfacInfluence "
            "(its K-FAC blocks are per layer)")
    raise ValueError(f"block_structure must be a BlockMode, got {block_structure!r}")


def _regularization(regularization: Any, name: str = "regularization") -> float:
    """A pyDVL regularization (None or a float) as torchfluence's float."""
    if regularization is None:
        return 0.0
    if isinstance(regularization, Mapping):
        raise NotImplementedError(
            f"{name}: a dict of per-block regularizations is not supported (block-diagonal curvature is not); "
            "pass one float")
    return check_regularization(regularization, name)


def _alias(new: Any, old: Any, new_name: str, old_name: str, default: Any) -> Any:
    """`new`, or the older pyDVL spelling `old` when only that was given."""
    if old is not _UNSET:
        if new is not _UNSET:
            raise TypeError(f"pass {new_name} or its older name {old_name}, not both")
        return old
    return default if new is _UNSET else new


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


# -- preconditioners ----------------------------------------------------------------------------------
class Preconditioner:
    """Base class of the CG preconditioners this module accepts."""


class JacobiPreconditioner(Preconditioner):
    """Divides by diag(H) + lambda, with diag(H) estimated by Hutchinson's method.

    Args:
        num_samples_estimator: random probes for the diagonal estimate.
    """

    def __init__(self, num_samples_estimator: int = 1) -> None:
        if isinstance(num_samples_estimator, bool) or not isinstance(num_samples_estimator, int) \
                or num_samples_estimator < 1:
            raise ValueError(f"num_samples_estimator must be a positive int, got {num_samples_estimator!r}")
        self.num_samples_estimator = num_samples_estimator

    def __repr__(self) -> str:
        return f"JacobiPreconditioner(num_samples_estimator={self.num_samples_estimator})"


class NystroemPreconditioner(Preconditioner):
    """A rank-``rank`` Nystrom sketch of H used as preconditioner (needs regularization > 0).

    Args:
        rank: sketch size.
    """

    def __init__(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.rank = rank

    def __repr__(self) -> str:
        return f"NystroemPreconditioner(rank={self.rank})"


def _preconditioner(preconditioner: Any) -> dict:
    """torchfluence CG keyword arguments for a pyDVL-style preconditioner object."""
    if preconditioner is None:
        return {}
    name = type(preconditioner).__name__
    if name == "JacobiPreconditioner" and hasattr(preconditioner, "num_samples_estimator"):
        return {"preconditioner": "jacobi", "preconditioner_samples": int(preconditioner.num_samples_estimator)}
    if name == "NystroemPreconditioner" and (hasattr(preconditioner, "rank") or hasattr(preconditioner, "_rank")):
        rank = getattr(preconditioner, "rank", None)
        return {"preconditioner": "nystroem",
                "preconditioner_rank": int(rank if rank is not None else preconditioner._rank)}
    raise NotImplementedError(
        f"preconditioner={preconditioner!r} is not supported: pass JacobiPreconditioner(num_samples_estimator) or "
        "NystroemPreconditioner(rank) from torchfluence.pydvl, or None")


# -- shared behaviour ---------------------------------------------------------------------------------
class _PydvlInterface:
    """pyDVL's method and property names on top of a torchfluence solver."""

    model: nn.Module
    loss: Any

    def _remember(self, model: nn.Module, loss: Any) -> None:
        self.model, self.loss = model, loss

    @property
    def n_parameters(self) -> int:
        """Number of parameters the influences are computed for."""
        return self.num_params

    @property
    def is_thread_safe(self) -> bool:
        return False

    def fit(self, data):
        """Fits on the training data (a DataLoader of (x, y) batches); returns self."""
        return super().fit(data)

    def influences(self, x_test: Tensor, y_test: Tensor, x: Optional[Tensor] = None, y: Optional[Tensor] = None,
                   mode: Union[InfluenceMode, str] = InfluenceMode.Up, **kwargs) -> Tensor:
        """Influences of (x, y) (default: the test points) on each test point; mode as an InfluenceMode or string."""
        return super().influences(x_test, y_test, x, y, mode=_mode(mode), **kwargs)

    def influences_from_factors(self, z_test_factors: Tensor, x: Tensor, y: Tensor,
                                mode: Union[InfluenceMode, str] = InfluenceMode.Up, **kwargs) -> Tensor:
        """Influences of (x, y) against precomputed :meth:`influence_factors`."""
        return super().influences_from_factors(z_test_factors, x, y, mode=_mode(mode), **kwargs)


class _SettableRegularization:
    def with_regularization(self, regularization: float):
        """Sets the regularization without refitting; returns self."""
        self.regularization = _regularization(regularization)
        return self


# -- solvers ------------------------------------------------------------------------------------------
class DirectInfluence(_PydvlInterface, _solvers.DirectInfluence):
    """Exact influences from the explicit curvature matrix (pyDVL's ``DirectInfluence``).

    Args:
        model: the model; the parameters with ``requires_grad`` are used.
        loss: ``loss(outputs, targets)``, the mean loss of a batch.
        regularization: lambda added to the curvature's diagonal (None: 0).
        block_structure: ``BlockMode.FULL`` only.
        second_order_mode: ``SecondOrderMode.HESSIAN`` or ``GAUSS_NEWTON`` (empirical Fisher, see
            :class:`EmpiricalFisher`).
        hessian_regularization: older name of ``regularization``.
    """

    def __init__(self, model: nn.Module, loss, regularization: Optional[float] = _UNSET,
                 block_structure: Any = BlockMode.FULL, second_order_mode: Any = SecondOrderMode.HESSIAN, *,
                 hessian_regularization: Optional[float] = _UNSET) -> None:
        regularization = _alias(regularization, hessian_regularization, "regularization", "hessian_regularization",
                                None)
        _check_block_structure(block_structure)
        super().__init__(model, loss, _regularization(regularization), **_second_order(second_order_mode))
        self._remember(model, loss)


class CgInfluence(_PydvlInterface, _SettableRegularization, _solvers.CgInfluence):
    """Conjugate gradients (pyDVL's ``CgInfluence``).

    Args:
        model, loss, regularization, block_structure, second_order_mode: as in :class:`DirectInfluence`.
        rtol, atol: a right-hand side b is solved once its residual satisfies
            ``||b - A x|| <= max(rtol * ||b||, atol)`` (A = H + lambda I).
        maxiter: iteration cap; None: 10 times the number of parameters.
        progress: progress bars.
        precompute_grad: accepted for signature compatibility; it does not change the results.
        preconditioner: None, :class:`JacobiPreconditioner` or :class:`NystroemPreconditioner`.
        solve_simultaneously: True: block CG, one Krylov space shared by all right-hand
            sides; False: independent CG per right-hand side.
        warn_on_max_iteration: warn when some right-hand side did not converge within maxiter.
        hessian_regularization, pre_conditioner, use_block_cg: older names of
            ``regularization``, ``preconditioner``, ``solve_simultaneously``.

    After a solve, :attr:`last_solve_info` holds iterations and residuals per right-hand side.
    """

    def __init__(self, model: nn.Module, loss, regularization: Optional[float] = _UNSET, rtol: float = 1e-4,
                 atol: float = 1e-6, maxiter: Optional[int] = None, progress: bool = False,
                 precompute_grad: bool = False, preconditioner: Optional[Preconditioner] = _UNSET,
                 solve_simultaneously: bool = _UNSET, warn_on_max_iteration: bool = True,
                 block_structure: Any = BlockMode.FULL, second_order_mode: Any = SecondOrderMode.HESSIAN, *,
                 hessian_regularization: Optional[float] = _UNSET, pre_conditioner: Any = _UNSET,
                 use_block_cg: bool = _UNSET) -> None:
        regularization = _alias(regularization, hessian_regularization, "regularization", "hessian_regularization",
                                None)
        preconditioner = _alias(preconditioner, pre_conditioner, "preconditioner", "pre_conditioner", None)
        solve_simultaneously = _alias(solve_simultaneously, use_block_cg, "solve_simultaneously", "use_block_cg",
                                      False)
        _check_block_structure(block_structure)
        if not isinstance(atol, (int, float)) or not math.isfinite(atol) or atol < 0:
            raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
        if not isinstance(precompute_grad, bool):
            raise TypeError(f"precompute_grad must be a bool, got {precompute_grad!r}")
        super().__init__(model, loss, _regularization(regularization), rtol=rtol, maxiter=maxiter,
                         block=bool(solve_simultaneously), progress=progress, **_preconditioner(preconditioner),
                         **_second_order(second_order_mode))
        if maxiter is None:
            self.maxiter = 10 * self.num_params
        self.atol = float(atol)
        self.precompute_grad = precompute_grad
        self.warn_on_max_iteration = bool(warn_on_max_iteration)
        self._remember(model, loss)

    @property
    def solve_simultaneously(self) -> bool:
        return self.block

    def solve(self, vectors: Tensor) -> Tensor:
        """(H + lambda I)^-1 times each row, each row to ``max(rtol * ||b||, atol)`` in residual norm."""
        self._require_fitted()
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        with warnings.catch_warnings():
            if not self.warn_on_max_iteration:
                warnings.filterwarnings("ignore", message="CG did not converge")
            if self.atol == 0:
                return super().solve(vectors)
            norms = vectors.norm(dim=1)
            # Relative tolerance each row needs: rtol, or more where atol / ||b|| is larger.
            needed = torch.clamp(self.atol / norms.clamp_min(1e-300), min=self.rtol)
            out = torch.zeros_like(vectors)  # rows with ||b|| <= atol are solved by x = 0
            relative_rows = (norms > self.atol) & (needed <= self.rtol)
            absolute_rows = (norms > self.atol) & (needed > self.rtol)
            rtol = self.rtol
            try:
                for rows in (relative_rows, absolute_rows):
                    if bool(rows.any()):
                        # One tolerance per group: the strictest its rows need.
                        self.rtol = float(needed[rows].min())
                        out[rows] = super().solve(vectors[rows])
            finally:
                self.rtol = rtol
            return out


class LissaInfluence(_PydvlInterface, _SettableRegularization, _solvers.LissaInfluence):
    """LiSSA (pyDVL's ``LissaInfluence``).

    Runs ``h <- v + (1 - dampen) h - (H_batch + lambda I) h / scale`` on random
    training minibatches of the loader's batch size and returns ``h / scale``.
    It stops early once every entry's relative change in a step,
    ``max |h_new - h| / |h_new|``, is below ``rtol``, and otherwise after ``maxiter`` steps.

    Args:
        model, loss, regularization, block_structure, second_order_mode: as in :class:`DirectInfluence`.
        maxiter, dampen, scale, rtol: as above (``scale`` must exceed the largest eigenvalue of H + lambda I).
        progress: progress bars.
        warn_on_max_iteration: warn when ``rtol`` was not reached within ``maxiter`` steps.
        hessian_regularization: older name of ``regularization``.
    """

    def __init__(self, model: nn.Module, loss, regularization: Optional[float] = _UNSET, maxiter: int = 1000,
                 dampen: float = 0.0, scale: float = 10.0, rtol: float = 1e-4, progress: bool = False,
                 warn_on_max_iteration: bool = True, block_structure: Any = BlockMode.FULL,
                 second_order_mode: Any = SecondOrderMode.HESSIAN, *,
                 hessian_regularization: Optional[float] = _UNSET) -> None:
        regularization = _alias(regularization, hessian_regularization, "regularization", "hessian_regularization",
                                None)
        _check_block_structure(block_structure)
        if not isinstance(rtol, (int, float)) or not rtol >= 0:
            raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
        super().__init__(model, loss, _regularization(regularization), maxiter=maxiter, dampen=dampen, scale=scale,
                         progress=progress, **_second_order(second_order_mode))
        self.rtol = float(rtol)
        self.warn_on_max_iteration = bool(warn_on_max_iteration)
        self.last_iterations: Optional[int] = None  # steps the last solve took
        self._remember(model, loss)

    def solve(self, vectors: Tensor) -> Tensor:
        self._require_fitted()
        v = vectors.to(device=self.device, dtype=self.dtype)
        h = v.clone()
        batches = self._minibatches(0)
        largest = float("inf")
        step = 0
        for step in range(1, self.maxiter + 1):
            x, y = next(batches)
            curvature = self.curvature_operator.batch_vp(h, x, y) + self.regularization * h
            new = v + (1 - self.dampen) * h - curvature / self.scale
            change = (new - h).abs()
            h = new
            if not bool(torch.isfinite(h).all()):
                raise ValueError(f"LiSSA diverged at step {step}: scale={self.scale:g} must exceed the largest "
                                 "eigenvalue of H + regularization * I; increase scale or dampen")
            relative = torch.where(change == 0, torch.zeros_like(change), change / h.abs())
            largest = float(relative.max()) if relative.numel() else 0.0
            if largest < self.rtol:
                break
        else:
            if self.warn_on_max_iteration:
                warnings.warn(f"LiSSA reached maxiter={self.maxiter} without the relative change per step falling "
                              f"below rtol={self.rtol:g} (last: {largest:.2e}); raise maxiter or scale",
                              stacklevel=3)
        self.last_iterations = step
        return h / self.scale


class ArnoldiInfluence(_PydvlInterface, _solvers.ArnoldiInfluence):
    """Low-rank inverse on the dominant eigenspace of the curvature (pyDVL's ``ArnoldiInfluence``).

    The ``rank`` eigenpairs of largest magnitude come from a (block) Lanczos
    iteration run on the model's device. With ``use_woodbury=False`` (default) the
    inverse is ``V (D + lambda)^-1 V^T`` (the component outside the eigenspace is
    dropped); with ``use_woodbury=True`` that component is kept as
    ``(I - V V^T) / lambda``, which needs ``regularization > 0``.

    Args:
        model, loss, regularization, block_structure, second_order_mode: as in :class:`DirectInfluence`.
        rank: eigenpairs kept.
        krylov_dimension: largest Krylov space (None: torchfluence's default, which grows
            the space only until the kept pairs converge).
        tol: relative residual ``||H v - l v|| / max |l|`` at which the kept pairs count as converged.
        max_iter: must be None (there are no restarts to cap; use ``krylov_dimension``).
        eigen_computation_on_gpu: accepted either way: the eigen computation always runs on the
            model's device, with torch.
        use_woodbury: see above.
        hessian_regularization, rank_estimate: older names of ``regularization``, ``rank``.
    """

    def __init__(self, model: nn.Module, loss, regularization: Optional[float] = _UNSET, rank: int = _UNSET,
                 krylov_dimension: Optional[int] = None, tol: float = 1e-6, max_iter: Optional[int] = None,
                 eigen_computation_on_gpu: bool = False, block_structure: Any = BlockMode.FULL,
                 second_order_mode: Any = SecondOrderMode.HESSIAN, use_woodbury: bool = False, *,
                 hessian_regularization: Optional[float] = _UNSET, rank_estimate: int = _UNSET) -> None:
        regularization = _alias(regularization, hessian_regularization, "regularization", "hessian_regularization",
                                None)
        rank = _alias(rank, rank_estimate, "rank", "rank_estimate", 10)
        _check_block_structure(block_structure)
        if max_iter is not None:
            raise NotImplementedError(
                f"max_iter={max_iter!r}: torchfluence's Lanczos iteration has no restarts to cap; leave max_iter=None "
                "and bound the work with krylov_dimension (the iteration also stops once the kept pairs reach tol)")
        if not isinstance(eigen_computation_on_gpu, bool):
            raise TypeError(f"eigen_computation_on_gpu must be a bool, got {eigen_computation_on_gpu!r}")
        regularization = _regularization(regularization)
        if use_woodbury and regularization <= 0:
            raise ValueError("use_woodbury=True needs regularization > 0 (the inverse divides by it)")
        super().__init__(model, loss, regularization, rank, krylov_dimension=krylov_dimension, tol=tol,
                         complement="regularization" if use_woodbury else "drop", **_second_order(second_order_mode))
        self.use_woodbury = bool(use_woodbury)
        self.eigen_computation_on_gpu = eigen_computation_on_gpu
        self._remember(model, loss)


class NystroemSketchInfluence(_PydvlInterface, _solvers.NystroemSketchInfluence):
    """Rank-``rank`` Nystrom sketch of the curvature with the Woodbury inverse (pyDVL's ``NystroemSketchInfluence``).

    Args:
        model, loss, block_structure, second_order_mode: as in :class:`DirectInfluence`.
        regularization: lambda > 0.
        rank: sketch size.
    """

    def __init__(self, model: nn.Module, loss, regularization: float, rank: int,
                 block_structure: Any = BlockMode.FULL, second_order_mode: Any = SecondOrderMode.HESSIAN) -> None:
        _check_block_structure(block_structure)
        super().__init__(model, loss, _regularization(regularization), rank, **_second_order(second_order_mode))
        self._remember(model, loss)


class EkfacInfluence(_PydvlInterface, _solvers.KfacInfluence):
    """K-FAC / EK-FAC for classifiers trained with cross-entropy (pyDVL's ``EkfacInfluence``).

    The loss is ``torch.nn.functional.cross_entropy``. The Kronecker factors are
    those of the Fisher of the model's predictive distribution, with the expectation
    over classes taken in closed form. With ``update_diagonal=True`` the eigenvalues
    are refitted to the gradients (EK-FAC); with False they are K-FAC's products of
    factor eigenvalues. Every parameter with ``requires_grad`` must belong to an
    ``nn.Linear`` (or ``nn.Conv2d``) layer.

    Args:
        model: the classifier (returns logits).
        update_diagonal: EK-FAC's eigenvalue correction.
        hessian_regularization: lambda added to the eigenvalues.
        progress: progress bars.
    """

    def __init__(self, model: nn.Module, update_diagonal: bool = False, hessian_regularization: float = 0.0,
                 progress: bool = False) -> None:
        super().__init__(model, F.cross_entropy, check_regularization(hessian_regularization, "hessian_regularization"),
                         fisher="exact", eigenvalue_correction=bool(update_diagonal), progress=progress)
        self.update_diagonal = bool(update_diagonal)
        self._remember(model, F.cross_entropy)

    @property
    def hessian_regularization(self) -> float:
        return self.regularization
