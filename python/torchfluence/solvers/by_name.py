"""The solvers by their short names, as the command line and the pytorch-influence-functions config say them."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import nn

from ..influence import InfluenceFunctionModel
from .arnoldi import ArnoldiInfluence
from .cg import CgInfluence
from .direct import DirectInfluence
from .kfac import EkfacInfluence, KfacInfluence
from .lissa import LissaInfluence
from .nystroem import NystroemSketchInfluence

SOLVERS: dict[str, type[InfluenceFunctionModel]] = {
    "ekfac": EkfacInfluence, "kfac": KfacInfluence, "cg": CgInfluence, "lissa": LissaInfluence,
    "arnoldi": ArnoldiInfluence, "direct": DirectInfluence, "nystroem": NystroemSketchInfluence,
}


def make_solver(name: str, model: nn.Module, loss: Any, regularization: float, *, rank: Optional[int] = None,
                seed: Optional[int] = None, second_order: Optional[str] = None,
                **options: Any) -> InfluenceFunctionModel:
    """The solver `name` (a key of :data:`SOLVERS`), not fitted.

    Args:
        rank: for the low-rank solvers (Arnoldi, Nystroem); None: ``min(10, number of parameters)``.
        seed: for the solvers that draw at random (ignored by the others).
        second_order: ``"hessian"``, ``"gauss_newton"`` or ``"empirical_fisher"``, for the solvers that
            take it (K-FAC and EK-FAC always use the Fisher).
        options: common options (``block_size``, ``dtype``, ``progress`` ...) and the class's own.
    """
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    cls = SOLVERS[name]
    own = {f.name for f in dataclasses.fields(cls.Options)}
    if second_order is not None and "second_order" not in cls.traits.fixed_options:
        options["second_order"] = second_order
    if seed is not None and "seed" in own:
        options["seed"] = seed
    if "rank" in own:
        if rank is None:
            rank = min(10, sum(p.numel() for p in model.parameters() if p.requires_grad))
        options["rank"] = rank
    return cls(model, loss, regularization, **options)
