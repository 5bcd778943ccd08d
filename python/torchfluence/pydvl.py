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
argument; none is ignored.

Block-diagonal curvature (``block_structure=BlockMode.LAYER_WISE``,
``BlockMode.PARAMETER_WISE`` or a dict ``{block name: [parameter names]}``) and
per-block ``regularization`` dicts are supported by :class:`DirectInfluence`,
:class:`CgInfluence`, :class:`LissaInfluence`, :class:`ArnoldiInfluence`,
:class:`NystroemSketchInfluence` and :class:`InverseHarmonicMeanInfluence`: the
curvature restricted to each block is solved on its own (cross-block terms dropped)
and the influence is the sum over the blocks. :class:`EkfacInfluence` is layer-wise
by construction.

This module holds pyDVL's names and argument meanings only: the blocks are the core's
(:mod:`torchfluence.parameter_blocks`, :mod:`torchfluence.solvers.block_diagonal`), and
``SecondOrderMode.GAUSS_NEWTON`` is the core's ``second_order="empirical_fisher"``
(:class:`~torchfluence.curvature.EmpiricalFisher`).

Not supported: Arnoldi's ``max_iter`` (ARPACK restarts), and preconditioners other
than :class:`JacobiPreconditioner` and :class:`NystroemPreconditioner`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import solvers as _solvers
from .contract import SolverOptions, option
from .checks import check_regularization
from .curvature import EmpiricalFisher
from .exceptions import (NotFittedException, NotImplementedLayerRepresentationException,
                         UnsupportedInfluenceModeException)
from .linear_head import loss_kind
from .parameter_blocks import block_regularization, grouped, resolve_blocks, smallest_regularization

__all__ = [
    "ArnoldiInfluence",
    "BlockMode",
    "CgInfluence",
    "DirectInfluence",
    "EkfacInfluence",
    "EmpiricalFisher",
    "InfluenceMode",
    "InverseHarmonicMeanInfluence",
    "JacobiPreconditioner",
    "LissaInfluence",
    "NotFittedException",
    "NotImplementedLayerRepresentationException",
    "NystroemPreconditioner",
    "NystroemSketchInfluence",
    "Preconditioner",
    "SecondOrderMode",
    "UnsupportedInfluenceModeException",
    "compute_influences",
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
    """How parameters are grouped into the blocks of a block-diagonal curvature.

    ``FULL``: one block with every trainable parameter (block name ``""``).
    ``LAYER_WISE``: one block per direct child module of the model, named as the child
    (e.g. ``"0"`` for the first layer of an ``nn.Sequential``), holding its trainable
    parameters (a Linear's weight and bias together); parameters registered on the
    model itself, outside every child, belong to no block and are left out.
    ``PARAMETER_WISE``: one block per trainable parameter tensor, named as the parameter.
    """

    LAYER_WISE = "layer_wise"
    PARAMETER_WISE = "parameter_wise"
    FULL = "full"


def _enum_value(value: Any) -> Any:
    """The value of an Enum member (of this module's enums or pyDVL's own), else `value`."""
    return value.value if isinstance(value, Enum) else value


def _mode(mode: Any) -> str:
    value = _enum_value(mode)
    if value not in ("up", "perturbation"):
        raise UnsupportedInfluenceModeException(mode)
    return value


# -- argument meanings --------------------------------------------------------------------------------
def _second_order(second_order_mode: Any) -> dict:
    """torchfluence keyword arguments for a pyDVL ``second_order_mode``."""
    value = _enum_value(second_order_mode)
    if value == "hessian":
        return {"second_order": "hessian"}
    if value == "gauss_newton":
        return {"second_order": "empirical_fisher"}
    raise ValueError(f"second_order_mode must be SecondOrderMode.HESSIAN or SecondOrderMode.GAUSS_NEWTON, "
                     f"got {second_order_mode!r}")


def _blocks(model: nn.Module, block_structure: Any) -> Optional[dict[str, list[str]]]:
    """The blocks ``{name: [parameter names]}`` of a pyDVL ``block_structure``; None for ``BlockMode.FULL``.

    A dict's blocks keep their order and that of their names (the flat order is their
    concatenation); names of parameters that do not require grad are left out, with a warning.
    """
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    if isinstance(block_structure, Mapping):
        blocks = {}
        for block, names in resolve_blocks(block_structure, list(named), complete=False).items():
            frozen = [n for n in names if not named[n].requires_grad]
            for n in frozen:
                warnings.warn(f"block_structure[{block!r}]: parameter {n!r} does not require grad and is "
                              "left out", stacklevel=3)
            if len(frozen) == len(names):
                raise ValueError(f"block_structure[{block!r}] has no trainable parameters")
            blocks[block] = [n for n in names if n not in frozen]
        return blocks
    value = _enum_value(block_structure)
    if value == "full":
        return None
    if value == "parameter_wise":
        blocks = resolve_blocks("parameter", trainable)
    elif value == "layer_wise":  # direct child modules; the root's own parameters belong to none
        outside = [n for n in trainable if "." not in n]
        if outside:
            warnings.warn(f"block_structure=BlockMode.LAYER_WISE: parameters {outside} belong to no child module and "
                          "are left out of the influences", stacklevel=3)
        blocks = grouped([n for n in trainable if "." in n], lambda n: n.partition(".")[0])
    else:
        raise ValueError(f"block_structure must be a BlockMode or a dict of block name -> parameter names, "
                         f"got {block_structure!r}")
    if not blocks:
        raise ValueError(f"block_structure={block_structure!r}: the model has no trainable parameters in any block")
    return blocks


def _block_arguments(blocks: Optional[dict[str, list[str]]]) -> dict:
    """torchfluence keyword arguments for resolved blocks: their parameters in block order, and the blocks."""
    if blocks is None:
        return {}
    params = [n for names in blocks.values() for n in names]
    return {"params": params, "head": False, "block_structure": blocks}


def _saved_blocks(blocks: Optional[dict[str, list[str]]]) -> Any:
    """A resolved block structure as a constructor argument that rebuilds it: ``"full"`` or the dict."""
    return "full" if blocks is None else {name: list(names) for name, names in blocks.items()}


def _regularization(regularization: Any, blocks: Optional[dict[str, list[str]]]) -> Union[float, dict]:
    """A pyDVL regularization as torchfluence's: None is 0; ``{block name: lambda}`` may leave blocks out
    (or map them to None): they get 0; the one block of ``BlockMode.FULL`` is named ``""``."""
    if not isinstance(regularization, Mapping):
        return 0.0 if regularization is None else check_regularization(regularization)
    names = [""] if blocks is None else list(blocks)
    given = {k: 0.0 if v is None else v for k, v in regularization.items()}
    values = block_regularization({**dict.fromkeys(names, 0.0), **given}, names)
    return values[""] if blocks is None else values


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
    """Base class of the CG preconditioners: M with M^-1 (A + lambda I) better conditioned than A + lambda I.

    Passed to :class:`CgInfluence`, a preconditioner only names its settings (the solver
    fits its own copy on the training curvature). On its own, :meth:`fit` fits it to an
    operator A and :meth:`solve` applies M^-1.
    """

    _reg: Optional[float] = None

    @property
    def regularization(self) -> Optional[float]:
        return self._reg

    @regularization.setter
    def regularization(self, value: Optional[float]) -> None:
        self._reg = self._check_regularization(value)

    @staticmethod
    def _check_regularization(value: Optional[float]) -> Optional[float]:
        if value is not None and value < 0:
            raise ValueError(f"regularization must be >= 0 or None, got {value!r}")
        return None if value is None else float(value)

    @property
    def modify_regularization_requires_fit(self) -> bool:
        return False

    @property
    def is_fitted(self) -> bool:
        raise NotImplementedError

    def fit(self, operator: Any, regularization: Optional[float] = None) -> "Preconditioner":
        """Fits M to A (+ `regularization` I); returns self.

        Args:
            operator: A as a (p, p) tensor, a callable ``(k, p) -> (k, p)`` of products with the
                rows, or an object with pyDVL's operator interface (``apply``, ``input_size``).
            regularization: lambda (None: 0).
        """
        self._reg = self._check_regularization(regularization)
        self._fit(*_operator_products(operator))
        return self

    def _fit(self, products: Any, p: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def solve(self, rhs: Tensor) -> Tensor:
        """M^-1 rhs: rhs is (p,) or (p, k) with the vectors as columns (pyDVL's layout)."""
        if not self.is_fitted:
            raise NotFittedException(f"{type(self).__name__} is not fitted: call .fit(operator, regularization)")
        rows = rhs.unsqueeze(0) if rhs.dim() == 1 else rhs.T
        out = self._solve_rows(rows)
        return out[0] if rhs.dim() == 1 else out.T

    def _solve_rows(self, rows: Tensor) -> Tensor:
        raise NotImplementedError


def _operator_products(operator: Any) -> tuple[Any, int, torch.dtype, torch.device]:
    """(products ``(k, p) -> (k, p)``, p, dtype, device) of a matrix, a callable or a pyDVL operator."""
    if isinstance(operator, Tensor):
        if operator.dim() != 2 or operator.shape[0] != operator.shape[1]:
            raise ValueError(f"operator must be a square (p, p) matrix, got shape {tuple(operator.shape)}")
        return (lambda v: v @ operator.T), operator.shape[0], operator.dtype, operator.device
    if hasattr(operator, "apply") and hasattr(operator, "input_size"):
        return operator.apply, int(operator.input_size), operator.dtype, operator.device
    raise TypeError(f"operator must be a (p, p) tensor or have apply() and input_size (pyDVL's TensorOperator), "
                    f"got {type(operator).__name__}")


class JacobiPreconditioner(Preconditioner):
    """Divides by diag(A) + lambda, with diag(A) estimated by Hutchinson's method.

    Args:
        num_samples_estimator: random probes for the diagonal estimate.
    """

    def __init__(self, num_samples_estimator: int = 1) -> None:
        if isinstance(num_samples_estimator, bool) or not isinstance(num_samples_estimator, int) \
                or num_samples_estimator < 1:
            raise ValueError(f"num_samples_estimator must be a positive int, got {num_samples_estimator!r}")
        self.num_samples_estimator = num_samples_estimator
        self._diag: Optional[Tensor] = None

    def __repr__(self) -> str:
        return f"JacobiPreconditioner(num_samples_estimator={self.num_samples_estimator})"

    @property
    def is_fitted(self) -> bool:
        return self._diag is not None

    def _fit(self, products: Any, p: int, dtype: torch.dtype, device: torch.device) -> None:
        # Rademacher probes: their estimate of a diagonal matrix's diagonal is exact.
        probes = torch.randint(0, 2, (self.num_samples_estimator, p), device=device).to(dtype) * 2 - 1
        self._diag = (probes * products(probes)).mean(dim=0)  # (p,)

    def _solve_rows(self, rows: Tensor) -> Tensor:
        # Hutchinson estimates can dip below zero; keep the preconditioner positive (as CgInfluence does).
        diag = self._diag.abs().clamp_min(1e-8 * float(self._diag.abs().max()))
        return rows / (diag + (self._reg or 0.0))

    def to(self, device: Any) -> "JacobiPreconditioner":
        if self._diag is not None:
            self._diag = self._diag.to(device)
        return self


class NystroemPreconditioner(Preconditioner):
    """A rank-``rank`` Nystrom sketch U diag(s) U^T of A as preconditioner (Frangella, Tropp & Udell 2023):
    M^-1 = (s_min + lambda) U (diag(s) + lambda)^-1 U^T + (I - U U^T).

    Args:
        rank: sketch size (capped by the number of parameters of what it is fitted to).
    """

    def __init__(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.rank = rank
        self._sketch: Any = None

    def __repr__(self) -> str:
        return f"NystroemPreconditioner(rank={self.rank})"

    @property
    def is_fitted(self) -> bool:
        return self._sketch is not None

    def _fit(self, products: Any, p: int, dtype: torch.dtype, device: torch.device) -> None:
        from .solvers._lowrank import LowRankCurvature
        from .solvers.nystroem import nystroem_sketch
        sketch = nystroem_sketch(products, p, min(self.rank, p), dtype, device, seed=0)
        self._sketch = LowRankCurvature(sketch.eigenvectors.to(dtype), sketch.eigenvalues.to(dtype))

    def _solve_rows(self, rows: Tensor) -> Tensor:
        return self._sketch.preconditioner_apply(rows, self._reg or 0.0)

    def to(self, device: Any) -> "NystroemPreconditioner":
        if self._sketch is not None:
            from .solvers._lowrank import LowRankCurvature
            self._sketch = LowRankCurvature(self._sketch.eigenvectors.to(device), self._sketch.eigenvalues.to(device))
        return self


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

    # -- the solver contract: options are pyDVL's constructor arguments ---------------------------------
    _arguments: SolverOptions  # the constructor's arguments, as JSON values, set by each __init__

    def options(self) -> SolverOptions:
        """The pyDVL constructor arguments this solver was built with (its class's ``Options``)."""
        return self._arguments

    def constructor_options(self) -> dict[str, Any]:
        """The pyDVL constructor arguments that rebuild this solver, with its current regularization."""
        return {**self._arguments.values(), "regularization": self.regularization}

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


class _PydvlBlocks:
    """pyDVL's names for the core's blocks (:class:`~torchfluence.solvers.block_diagonal.BlockDiagonal`)."""

    blocks: Optional[dict[str, list[str]]]

    @property
    def block_names(self) -> list[str]:
        """The blocks' names (``[""]`` for ``BlockMode.FULL``)."""
        return [""] if self.blocks is None else list(self.blocks)

    def _score_columns(self) -> dict:
        columns = super()._score_columns()  # the one block of BlockMode.FULL is named "" here too
        return {"": columns["full"]} if self.blocks is None else columns

    def with_regularization(self, regularization: Any):
        """Sets the regularization (None, one float, or ``{block name: lambda}``, blocks left out getting 0)
        without refitting; returns self."""
        return super().with_regularization(_regularization(regularization, self.blocks))


class _AtolSolve:
    """CG solves each right-hand side b to ``||b - A x|| <= max(rtol**2 * ||b||, atol**2)`` (pyDVL's stopping rule).

    pyDVL 0.10's documentation says ``max(rtol * ||b||, atol)``, but its code (both CG
    variants) compares the residual norm with the squares, and its tests' tolerances rely
    on the tighter rule; the classes here follow the code. With blocks, each block's
    solver applies the rule to its own columns.
    """

    atol: float
    warn_on_max_iteration: bool

    def solve(self, vectors: Tensor) -> Tensor:
        """(H + lambda I)^-1 times each row, each row to ``max(rtol**2 * ||b||, atol**2)`` in residual norm."""
        if self.blocks is not None:
            return super().solve(vectors)
        self._require_fitted()
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        rtol, atol = self.rtol, self.atol
        relative, absolute = rtol ** 2, atol ** 2
        with warnings.catch_warnings():
            if not self.warn_on_max_iteration:
                warnings.filterwarnings("ignore", message="CG did not converge")
            try:
                if absolute == 0:
                    self.rtol = relative
                    return super().solve(vectors)
                norms = vectors.norm(dim=1)
                # Relative tolerance each row needs: rtol**2, or more where atol**2 / ||b|| is larger.
                needed = torch.clamp(absolute / norms.clamp_min(1e-300), min=relative)
                out = torch.zeros_like(vectors)  # rows with ||b|| <= atol**2 are solved by x = 0
                relative_rows = (norms > absolute) & (needed <= relative)
                absolute_rows = (norms > absolute) & (needed > relative)
                for rows in (relative_rows, absolute_rows):
                    if bool(rows.any()):
                        # One tolerance per group: the strictest its rows need.
                        self.rtol = float(needed[rows].min())
                        out[rows] = super().solve(vectors[rows])
                return out
            finally:
                self.rtol = rtol


class _CgBlock(_AtolSolve, _solvers.CgInfluence):
    """One block of a block-diagonal :class:`CgInfluence`."""


# -- constructor arguments (the solver contract's options) --------------------------------------------
@dataclass(frozen=True)
class _BlockArguments(SolverOptions):
    """The arguments of every block-diagonal solver; its fitted state depends on both."""

    block_structure: Any = option(fit=True, doc="None for BlockMode.FULL, else {block name: [parameter names]}")
    second_order_mode: Any = option(fit=True, doc="SecondOrderMode's value")


@dataclass(frozen=True)
class _DirectArguments(_BlockArguments):
    """DirectInfluence's arguments."""


@dataclass(frozen=True)
class _CgArguments(_BlockArguments):
    """CgInfluence's arguments."""

    rtol: float = option()
    atol: float = option()
    maxiter: Optional[int] = option()
    progress: bool = option()
    precompute_grad: bool = option()
    preconditioner: Optional[dict] = option(fit=True, doc="the preconditioner's settings")
    solve_simultaneously: bool = option()
    warn_on_max_iteration: bool = option()


@dataclass(frozen=True)
class _LissaArguments(_BlockArguments):
    """LissaInfluence's arguments."""

    maxiter: int = option()
    dampen: float = option()
    scale: float = option()
    progress: bool = option()
    rtol: float = option()
    warn_on_max_iteration: bool = option()


@dataclass(frozen=True)
class _ArnoldiArguments(_BlockArguments):
    """ArnoldiInfluence's arguments."""

    rank: int = option(fit=True)
    krylov_dimension: Optional[int] = option(fit=True)
    tol: float = option(fit=True)
    eigen_computation_on_gpu: bool = option()
    use_woodbury: bool = option()


@dataclass(frozen=True)
class _NystroemArguments(_BlockArguments):
    """NystroemSketchInfluence's arguments."""

    rank: int = option(fit=True)


@dataclass(frozen=True)
class _EkfacArguments(SolverOptions):
    """EkfacInfluence's arguments."""

    update_diagonal: bool = option(fit=True)
    progress: bool = option()


@dataclass(frozen=True)
class _DataInfArguments(_BlockArguments):
    """InverseHarmonicMeanInfluence's arguments."""


# -- solvers ------------------------------------------------------------------------------------------
class DirectInfluence(_PydvlInterface, _PydvlBlocks, _solvers.DirectInfluence):
    """Exact influences from the explicit curvature matrix (pyDVL's ``DirectInfluence``).

    Args:
        model: the model; the parameters with ``requires_grad`` are used.
        loss: ``loss(outputs, targets)``, the mean loss of a batch.
        regularization: lambda added to the curvature's diagonal: None (0), one float, or
            ``{block name: lambda}`` (blocks left out get 0).
        block_structure: ``BlockMode.FULL`` (the full curvature), ``BlockMode.LAYER_WISE``,
            ``BlockMode.PARAMETER_WISE``, or ``{block name: [parameter names]}``: the curvature
            is block-diagonal over these blocks (see :class:`BlockMode`), each block
            solved exactly with its own lambda.
        second_order_mode: ``SecondOrderMode.HESSIAN`` or ``GAUSS_NEWTON`` (empirical Fisher, see
            :class:`EmpiricalFisher`).
        hessian_regularization: older name of ``regularization``.

    With blocks, :attr:`curvature` is the block-diagonal matrix (cross-block entries zero).
    """

    Options = _DirectArguments
    traits = replace(_solvers.DirectInfluence.traits, load_only_options=())  # no cache_dir: pyDVL's classes take no head mode

    def __init__(self, model: nn.Module, loss, regularization: Optional[float] = _UNSET,
                 block_structure: Any = BlockMode.FULL, second_order_mode: Any = SecondOrderMode.HESSIAN, *,
                 hessian_regularization: Optional[float] = _UNSET) -> None:
        regularization = _alias(regularization, hessian_regularization, "regularization", "hessian_regularization",
                                None)
        blocks = _blocks(model, block_structure)
        super().__init__(model, loss, _regularization(regularization, blocks), **_block_arguments(blocks),
                         **_second_order(second_order_mode))
        self._arguments = _DirectArguments(block_structure=_saved_blocks(blocks),
                                           second_order_mode=_enum_value(second_order_mode))
        self._remember(model, loss)


class CgInfluence(_PydvlInterface, _PydvlBlocks, _AtolSolve, _solvers.CgInfluence):
    """Conjugate gradients (pyDVL's ``CgInfluence``).

    Args:
        model, loss, regularization, block_structure, second_order_mode: as in :class:`DirectInfluence`;
            with blocks, each block is solved by its own CG (its own preconditioner, tolerances
            and iteration cap; see :attr:`block_solvers`).
        rtol, atol: a right-hand side b is solved once its residual satisfies
            ``||b - A x|| <= max(rtol**2 * ||b||, atol**2)`` (A = H + lambda I; per block with
            blocks): the squares, as pyDVL's code compares them (its documentation says
            ``max(rtol * ||b||, atol)``).
        maxiter: iteration cap; None: 10 times the number of parameters (of the block).
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

    Options = _CgArguments
    traits = replace(_solvers.CgInfluence.traits, load_only_options=())  # no cache_dir: pyDVL's classes take no head mode

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
        if not isinstance(atol, (int, float)) or not math.isfinite(atol) or atol < 0:
            raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
        if not isinstance(precompute_grad, bool):
            raise TypeError(f"precompute_grad must be a bool, got {precompute_grad!r}")
        blocks = _blocks(model, block_structure)
        preconditioning = _preconditioner(preconditioner)
        # With blocks, each block has its own preconditioner (see _block_solver).
        super().__init__(model, loss, _regularization(regularization, blocks), rtol=rtol, maxiter=maxiter,
                         block=bool(solve_simultaneously), progress=progress,
                         **(preconditioning if blocks is None else {}), **_block_arguments(blocks),
                         **_second_order(second_order_mode))
        if maxiter is None:
            self.maxiter = 10 * self.num_params
        self.atol = float(atol)
        self.precompute_grad = precompute_grad
        self.warn_on_max_iteration = bool(warn_on_max_iteration)
        self._arguments = _CgArguments(
            rtol=rtol, atol=self.atol, maxiter=maxiter, progress=progress, precompute_grad=precompute_grad,
            preconditioner=preconditioning or None, solve_simultaneously=bool(solve_simultaneously),
            warn_on_max_iteration=self.warn_on_max_iteration, block_structure=_saved_blocks(blocks),
            second_order_mode=_enum_value(second_order_mode))
        self._remember(model, loss)

    def _block_solver(self, params: list[str], regularization: float) -> _CgBlock:
        """A block's CG, with pyDVL's arguments: its own preconditioner, atol rule and iteration cap."""
        a = self._arguments
        preconditioning = dict(a.preconditioner or {})
        if "preconditioner_rank" in preconditioning:  # a sketch of a small block has at most its size
            sizes = dict(zip(self.functions.names, self.functions.sizes))
            preconditioning["preconditioner_rank"] = min(preconditioning["preconditioner_rank"],
                                                         sum(sizes[n] for n in params))
        block = _CgBlock(self.model, self.loss, regularization, params=params, head=False, maxiter=a.maxiter,
                         rtol=a.rtol, block=a.solve_simultaneously, progress=a.progress,
                         **preconditioning, **_second_order(a.second_order_mode))
        if a.maxiter is None:
            block.maxiter = 10 * block.num_params
        block.atol, block.warn_on_max_iteration = a.atol, a.warn_on_max_iteration
        return block

    @classmethod
    def from_constructor_options(cls, model: nn.Module, loss: Any, options: dict[str, Any]) -> "CgInfluence":
        """The solver from saved constructor arguments (the preconditioner saved as its settings)."""
        saved = options.get("preconditioner")
        if isinstance(saved, Mapping):
            options = dict(options)
            options["preconditioner"] = (JacobiPreconditioner(saved["preconditioner_samples"])
                                         if saved["preconditioner"] == "jacobi"
                                         else NystroemPreconditioner(saved["preconditioner_rank"]))
        return cls(model, loss, **options)

    @property
    def solve_simultaneously(self) -> bool:
        return self.block


class _LissaIteration:
    """pyDVL's LiSSA loop with its early stop on the relative change per step (with blocks, each block's)."""

    rtol: float
    warn_on_max_iteration: bool
    last_iterations: Optional[int] = None  # steps the last solve took

    def stopping(self, rtol: float, warn_on_max_iteration: bool):
        self.rtol, self.warn_on_max_iteration = rtol, warn_on_max_iteration
        return self

    def solve(self, vectors: Tensor) -> Tensor:
        if self.blocks is not None:
            return super().solve(vectors)
        self._require_fitted()
        v = vectors.to(device=self.device, dtype=self.dtype)
        h = v.clone()
        batches = self._minibatches(0)
        largest = float("inf")
        step = 0
        for step in range(1, self.maxiter + 1):
            curvature = self._minibatch_vp(h, *next(batches)) + self.regularization * h
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


class _LissaBlock(_LissaIteration, _solvers.LissaInfluence):
    """One block of a block-diagonal :class:`LissaInfluence`."""


class LissaInfluence(_PydvlInterface, _PydvlBlocks, _LissaIteration, _solvers.LissaInfluence):
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

    Options = _LissaArguments
    traits = replace(_solvers.LissaInfluence.traits, load_only_options=())  # no cache_dir: pyDVL's classes take no head mode

    def __init__(self, model: nn.Module, loss, regularization: Optional[float] = _UNSET, maxiter: int = 1000,
                 dampen: float = 0.0, scale: float = 10.0, rtol: float = 1e-4, progress: bool = False,
                 warn_on_max_iteration: bool = True, block_structure: Any = BlockMode.FULL,
                 second_order_mode: Any = SecondOrderMode.HESSIAN, *,
                 hessian_regularization: Optional[float] = _UNSET) -> None:
        regularization = _alias(regularization, hessian_regularization, "regularization", "hessian_regularization",
                                None)
        if not isinstance(rtol, (int, float)) or not rtol >= 0:
            raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
        blocks = _blocks(model, block_structure)
        super().__init__(model, loss, _regularization(regularization, blocks), maxiter=maxiter, dampen=dampen,
                         scale=scale, progress=progress, **_block_arguments(blocks),
                         **_second_order(second_order_mode))
        self.stopping(float(rtol), bool(warn_on_max_iteration))
        self._arguments = _LissaArguments(maxiter=maxiter, dampen=dampen, scale=scale, progress=progress,
                                          rtol=self.rtol, warn_on_max_iteration=self.warn_on_max_iteration,
                                          block_structure=_saved_blocks(blocks),
                                          second_order_mode=_enum_value(second_order_mode))
        self._remember(model, loss)

    def _block_solver(self, params: list[str], regularization: float) -> _LissaBlock:
        """A block's LiSSA, with pyDVL's arguments and early stop."""
        a = self._arguments
        return _LissaBlock(self.model, self.loss, regularization, params=params, head=False,
                           maxiter=a.maxiter, dampen=a.dampen, scale=a.scale, progress=a.progress,
                           **_second_order(a.second_order_mode)).stopping(a.rtol, a.warn_on_max_iteration)


class ArnoldiInfluence(_PydvlInterface, _PydvlBlocks, _solvers.ArnoldiInfluence):
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

    Options = _ArnoldiArguments
    traits = replace(_solvers.ArnoldiInfluence.traits, load_only_options=())  # no cache_dir: pyDVL's classes take no head mode

    def __init__(self, model: nn.Module, loss, regularization: Optional[float] = _UNSET, rank: int = _UNSET,
                 krylov_dimension: Optional[int] = None, tol: float = 1e-6, max_iter: Optional[int] = None,
                 eigen_computation_on_gpu: bool = False, block_structure: Any = BlockMode.FULL,
                 second_order_mode: Any = SecondOrderMode.HESSIAN, use_woodbury: bool = False, *,
                 hessian_regularization: Optional[float] = _UNSET, rank_estimate: int = _UNSET) -> None:
        regularization = _alias(regularization, hessian_regularization, "regularization", "hessian_regularization",
                                None)
        rank = _alias(rank, rank_estimate, "rank", "rank_estimate", 10)
        if max_iter is not None:
            raise NotImplementedError(
                f"max_iter={max_iter!r}: torchfluence's Lanczos iteration has no restarts to cap; leave max_iter=None "
                "and bound the work with krylov_dimension (the iteration also stops once the kept pairs reach tol)")
        if not isinstance(eigen_computation_on_gpu, bool):
            raise TypeError(f"eigen_computation_on_gpu must be a bool, got {eigen_computation_on_gpu!r}")
        blocks = _blocks(model, block_structure)
        regularization = _regularization(regularization, blocks)
        if use_woodbury and smallest_regularization(regularization) <= 0:
            raise ValueError("use_woodbury=True needs regularization > 0 (the inverse divides by it)")
        # Each block keeps `rank` eigenpairs, at most as many as it has parameters.
        super().__init__(model, loss, regularization, rank, krylov_dimension=krylov_dimension, tol=tol,
                         complement="regularization" if use_woodbury else "drop", **_block_arguments(blocks),
                         **_second_order(second_order_mode))
        self.use_woodbury = bool(use_woodbury)
        self.eigen_computation_on_gpu = eigen_computation_on_gpu
        self._arguments = _ArnoldiArguments(rank=rank, krylov_dimension=krylov_dimension, tol=tol,
                                     eigen_computation_on_gpu=eigen_computation_on_gpu,
                                     block_structure=_saved_blocks(blocks),
                                     second_order_mode=_enum_value(second_order_mode), use_woodbury=self.use_woodbury)
        self._remember(model, loss)


class NystroemSketchInfluence(_PydvlInterface, _PydvlBlocks, _solvers.NystroemSketchInfluence):
    """Rank-``rank`` Nystrom sketch of the curvature with the Woodbury inverse (pyDVL's ``NystroemSketchInfluence``).

    Args:
        model, loss, block_structure, second_order_mode: as in :class:`DirectInfluence`.
        regularization: lambda > 0.
        rank: sketch size.
    """

    Options = _NystroemArguments
    traits = replace(_solvers.NystroemSketchInfluence.traits, load_only_options=())  # no cache_dir: pyDVL's classes take no head mode

    def __init__(self, model: nn.Module, loss, regularization: float, rank: int,
                 block_structure: Any = BlockMode.FULL, second_order_mode: Any = SecondOrderMode.HESSIAN) -> None:
        blocks = _blocks(model, block_structure)
        # Each block keeps a sketch of rank `rank`, at most as many as it has parameters.
        super().__init__(model, loss, _regularization(regularization, blocks), rank,
                         **_block_arguments(blocks), **_second_order(second_order_mode))
        self._arguments = _NystroemArguments(rank=rank, block_structure=_saved_blocks(blocks),
                                     second_order_mode=_enum_value(second_order_mode))
        self._remember(model, loss)


class EkfacInfluence(_PydvlInterface, _solvers.KfacInfluence):
    """K-FAC / EK-FAC for classifiers trained with cross-entropy (pyDVL's ``EkfacInfluence``).

    The loss is ``torch.nn.functional.cross_entropy``. The Kronecker factors are
    those of the Fisher of the model's predictive distribution, with the expectation
    over classes taken in closed form. With ``update_diagonal=True`` the eigenvalues
    are refitted to the gradients (EK-FAC); with False they are K-FAC's products of
    factor eigenvalues. Every parameter with ``requires_grad`` must belong to an
    ``nn.Linear`` (or ``nn.Conv1d``/``Conv2d``/``Conv3d``) layer.

    Args:
        model: the classifier (returns logits).
        update_diagonal: EK-FAC's eigenvalue correction.
        hessian_regularization: lambda added to the eigenvalues.
        progress: progress bars.
    """

    Options = _EkfacArguments
    traits = replace(_solvers.KfacInfluence.traits, load_only_options=())  # no cache_dir: pyDVL's classes take no head mode

    def __init__(self, model: nn.Module, update_diagonal: bool = False, hessian_regularization: float = 0.0,
                 progress: bool = False) -> None:
        super().__init__(model, F.cross_entropy, check_regularization(hessian_regularization, "hessian_regularization"),
                         fisher="exact", eigenvalue_correction=bool(update_diagonal), progress=progress)
        self.update_diagonal = bool(update_diagonal)
        self._arguments = _EkfacArguments(update_diagonal=self.update_diagonal, progress=progress)
        self._remember(model, F.cross_entropy)

    def constructor_options(self) -> dict[str, Any]:
        return {**self._arguments.values(), "hessian_regularization": self.regularization}

    def fit(self, data):
        """Fits the Kronecker factors; returns self.

        Raises:
            NotImplementedLayerRepresentationException: a layer other than nn.Linear (a convolution)
                has a singular factored curvature at ``hessian_regularization=0``: pyDVL represents
                Linear layers only and raises this for such a model; here the Linear layers are
                fitted too, and a positive ``hessian_regularization`` makes the conv layers usable.
        """
        try:
            return super().fit(data)
        except ValueError as error:
            others = [name for name, m in self.model.named_modules()
                      if not isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters(recurse=False))]
            if others and self.regularization == 0:
                raise NotImplementedLayerRepresentationException(
                    f"layers {others} are not nn.Linear and their Kronecker-factored curvature is singular with "
                    f"hessian_regularization=0 ({error}); pass hessian_regularization > 0") from error
            raise

    @classmethod
    def from_constructor_options(cls, model: nn.Module, loss: Any, options: dict[str, Any]) -> "EkfacInfluence":
        """The solver from saved constructor arguments; `loss` must be the cross-entropy it always uses."""
        if loss_kind(loss) != "cross_entropy":
            raise ValueError(f"loss: EkfacInfluence is fitted with cross-entropy, got {loss!r}")
        return cls(model, **options)

    @property
    def hessian_regularization(self) -> float:
        return self.regularization


class InverseHarmonicMeanInfluence(_PydvlInterface, _solvers.InverseHarmonicMeanInfluence):
    """DataInf (pyDVL's ``InverseHarmonicMeanInfluence``): the mean of the inverses of the damped
    rank-one terms ``g_i g_i^T + lambda I`` in place of the inverse of their mean.

    Args:
        model, loss: as in :class:`DirectInfluence`.
        regularization: lambda > 0, or ``{block name: lambda}`` with one entry per block.
        block_structure: ``BlockMode.FULL`` (pyDVL's default: one block), ``LAYER_WISE``
            (one block per direct child module), ``PARAMETER_WISE`` (one per parameter
            tensor) or ``{block name: [parameter names]}``.
        second_order_mode: ``SecondOrderMode.GAUSS_NEWTON`` only (DataInf is built on the
            empirical Fisher).
    """

    Options = _DataInfArguments
    traits = replace(_solvers.InverseHarmonicMeanInfluence.traits, load_only_options=())  # no cache_dir: pyDVL's classes take no head mode

    def __init__(self, model: nn.Module, loss, regularization: Union[float, Mapping[str, float]],
                 block_structure: Any = BlockMode.FULL,
                 second_order_mode: Any = SecondOrderMode.GAUSS_NEWTON) -> None:
        if _enum_value(second_order_mode) != _enum_value(SecondOrderMode.GAUSS_NEWTON):
            raise ValueError(f"second_order_mode: InverseHarmonicMeanInfluence approximates the empirical Fisher "
                             f"(SecondOrderMode.GAUSS_NEWTON), got {second_order_mode!r}")
        blocks = _blocks(model, block_structure)
        structure: Any = "full" if blocks is None else blocks
        if isinstance(regularization, Mapping) and blocks is None:
            regularization = {"full": regularization[""]} if set(regularization) == {""} else regularization
        extra = {} if blocks is None else {"params": [n for names in blocks.values() for n in names], "head": False}
        super().__init__(model, loss, regularization, block_structure=structure, **extra)
        self._arguments = _DataInfArguments(block_structure=_saved_blocks(blocks),
                                     second_order_mode=_enum_value(second_order_mode))
        self._remember(model, loss)

    def _score_columns(self) -> dict:
        columns = super()._score_columns()  # the one block of BlockMode.FULL is named "", as by the others
        return {"": columns["full"]} if self._arguments.block_structure == "full" else columns



# -- pyDVL's functional API (0.4-0.6) -----------------------------------------------------------------
_INVERSION_METHODS = {
    "direct": lambda model, loss, reg, kw: DirectInfluence(model, loss, reg, **kw),
    "cg": lambda model, loss, reg, kw: CgInfluence(model, loss, reg, solve_simultaneously=False, **kw),
    "batched_cg": lambda model, loss, reg, kw: CgInfluence(model, loss, reg, solve_simultaneously=True, **kw),
    "lissa": lambda model, loss, reg, kw: LissaInfluence(model, loss, reg, **kw),
    "arnoldi": lambda model, loss, reg, kw: ArnoldiInfluence(model, loss, reg, **kw),
    "nystroem": lambda model, loss, reg, kw: NystroemSketchInfluence(model, loss, reg, **kw),
    "ekfac": lambda model, loss, reg, kw: EkfacInfluence(model, hessian_regularization=reg, **kw),
}
# Older pyDVL names of the CG arguments; those with no meaning here are refused by name.
_OLD_CG_NAMES = {"max_iterations": "maxiter", "max_iter": "maxiter"}


def compute_influences(model: nn.Module, loss: Any, x: Any, y: Any, x_test: Any = None, y_test: Any = None,
                       progress: bool = False, inversion_method: Any = "direct", influence_type: Any = "up",
                       inversion_method_kwargs: Optional[dict] = None,
                       hessian_regularization: float = 0.0) -> Any:
    """Influences of each training point on each test point in one call (pyDVL 0.4-0.6's ``compute_influences``).

    Args:
        model: the trained model.
        loss: ``loss(outputs, targets)``, e.g. ``nn.CrossEntropyLoss()``.
        x, y: (n, ...) training inputs and targets (tensors or NumPy arrays).
        x_test, y_test: (n_test, ...) test inputs and targets (default: the training points).
        progress: progress bars.
        inversion_method: ``"direct"``, ``"cg"`` (one CG per test point), ``"batched_cg"`` (block CG),
            ``"lissa"``, ``"arnoldi"``, ``"nystroem"`` or ``"ekfac"`` (an Enum of these values too).
        influence_type: ``"up"`` or ``"perturbation"`` (an Enum of these values too).
        inversion_method_kwargs: further arguments of the class that inverts (e.g. ``rtol``,
            ``maxiter``, ``rank``); pyDVL's older ``max_iterations`` is ``maxiter``.
        hessian_regularization: lambda added to the curvature's diagonal.

    Returns:
        A NumPy array: (n_test, n) for ``"up"``, (n_test, n, *x.shape[1:]) for ``"perturbation"``;
        entry (i, j) is ``grad L(z_test_i)^T (H + lambda I)^-1 grad L(z_j)`` for ``"up"``.
    """
    method = _enum_value(inversion_method)
    if method not in _INVERSION_METHODS:
        raise ValueError(f"inversion_method must be one of {sorted(_INVERSION_METHODS)}, got {inversion_method!r}")
    mode = _mode(influence_type)
    kwargs = {_OLD_CG_NAMES.get(k, k): v for k, v in (inversion_method_kwargs or {}).items()}
    for name in ("max_step_size", "verify_assumptions"):
        if name in kwargs:
            raise NotImplementedError(f"inversion_method_kwargs[{name!r}] (pyDVL's SciPy CG) has no counterpart: "
                                      "torchfluence's CG takes rtol, atol, maxiter and a preconditioner")
    if method in ("cg", "batched_cg", "lissa", "ekfac"):  # the classes with progress bars
        kwargs.setdefault("progress", progress)

    def tensor(value: Any) -> Tensor:
        return value if isinstance(value, Tensor) else torch.as_tensor(value)

    x, y = tensor(x), tensor(y)
    x_test, y_test = (x, y) if x_test is None else (tensor(x_test), tensor(y_test))
    solver = _INVERSION_METHODS[method](model, loss, hessian_regularization, kwargs)
    solver.fit((x, y))
    return solver.influences(x_test, y_test, x, y, mode=mode).detach().cpu().numpy()
