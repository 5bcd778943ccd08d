"""The solver contract: what every solver class declares about itself.

Persistence (:mod:`torchfluence.persist`), resumable jobs (:mod:`torchfluence.journal`),
the gradient store and the command line read these declarations; none of them
inspects a solver's constructor or probes it for optional attributes.

A solver class declares:

- ``Options``: a :class:`SolverOptions` dataclass of its own constructor options
  (those beyond the ones every solver takes). A field made with ``option(fit=True)``
  decides the fitted state: a saved solver keeps it, and a load that asks for
  another value is refused.
- ``traits``: a :class:`SolverTraits`: which optional inputs the class takes and
  what its solves read.
- ``fitted_state()`` / ``restore_fitted_state()``: the tensors and JSON facts its
  fit leaves, and how to put them back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

# Options every solver takes whose value its fitted state depends on: a load keeps them.
COMMON_FIT_OPTIONS = frozenset({"params", "head", "second_order", "dtype", "curvature"})


@dataclass(frozen=True)
class SolverTraits:
    """What a solver class takes and what its solves need.

    Attributes:
        accepts_projector: whether ``projector=`` (a projected gradient space) is taken.
        projector_refusal: why not, when it is not (said in the error).
        accepts_block_structure: whether ``block_structure=`` (a block-diagonal curvature over
            groups of parameters, :mod:`torchfluence.parameter_blocks`) is taken.
        block_structure_refusal: why not, when it is not (said in the error).
        solve_reads_train_data: every solve reads the training data (CG, LiSSA, DataInf),
            so a load needs ``train_data=``.
        solves_rows_independently: the solve is one fixed linear map applied to each row,
            so test factors can be computed a block of rows at a time.
        fixed_options: options every solver takes that this class sets itself (refused as
            arguments, or meaningless for it); they are left out of its saved options.
        load_only_options: options a load accepts although they are not saved (runtime
            places such as ``cache_dir``).
    """

    accepts_projector: bool = True
    projector_refusal: str = ""
    accepts_block_structure: bool = False
    block_structure_refusal: str = ""
    solve_reads_train_data: bool = False
    solves_rows_independently: bool = False
    fixed_options: tuple[str, ...] = ()
    load_only_options: tuple[str, ...] = ("cache_dir",)

    def check_block_structure(self, solver: str, projector: Any) -> None:
        """Refuses ``block_structure=`` for a class that does not take it, or together with a projector.

        Args:
            solver: the class's name, for the message.
            projector: the ``projector=`` given with it (None: none).
        """
        if not self.accepts_block_structure:
            raise ValueError(f"{solver} does not take block_structure=: {self.block_structure_refusal}")
        if projector is not None:
            raise ValueError("block_structure= cannot be combined with projector=: a projection mixes the "
                             "parameters of every block into each of its k coordinates, so no block of "
                             "parameters is left to solve apart; pass one or the other")


def option(*, fit: bool = False, doc: str = "") -> Any:
    """A field of a :class:`SolverOptions` dataclass.

    Args:
        fit: whether the solver's fitted state depends on this option.
        doc: what the option means (shown in the dataclass's field metadata).
    """
    return field(metadata={"fit": fit, "doc": doc})


@dataclass(frozen=True)
class SolverOptions:
    """Base of each solver's own options; subclasses are frozen dataclasses of :func:`option` fields."""

    @classmethod
    def of(cls, solver: Any) -> "SolverOptions":
        """The options `solver` was built with, read from its attributes of the same names."""
        return cls(**{f.name: getattr(solver, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def fit_fields(cls) -> frozenset[str]:
        """Names of the options the fitted state depends on."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("fit"))

    def values(self) -> dict[str, Any]:
        """The options as constructor keyword arguments (Python values)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON values: dtypes and paths as strings, enums by value, classes by name."""
        return {name: plain(value) for name, value in self.values().items()}


def plain(value: Any) -> Any:
    """`value` as a JSON value: dtypes, devices and paths as strings, enums by value, classes by name.

    Raises:
        TypeError: for a value with no JSON form (a module, a function, a tensor).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, Enum):
        return plain(value.value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    raise TypeError(f"an option of type {type(value).__name__} has no JSON form")
