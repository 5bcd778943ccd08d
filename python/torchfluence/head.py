"""Head mode: any solver on a model's trainable head over cached backbone features.

:mod:`torchfluence.backbone` computes the features; this module only builds the
solver with ``head=`` set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from .backbone import HeadSpec
from .influence import InfluenceFunctionModel


def HeadInfluence(solver: type, model: nn.Module, loss, regularization: float = 0.0, *,  # noqa: N802 - a class's name
                  head: Optional[HeadSpec] = None, cache_dir: Optional[Union[str, Path]] = None,
                  batch_size: int = 256, **solver_kwargs: Any):
    """`solver` on `model`'s trainable head over cached backbone features.

    The same as ``solver(model, loss, regularization, head=head or "auto",
    cache_dir=cache_dir, block_size=batch_size, **solver_kwargs)``: the result is
    an instance of `solver`, with its whole API (inputs are the model's inputs;
    factors are (n_test, p_head)).

    Args:
        solver: the solver class, e.g. ``CgInfluence`` or ``EkfacInfluence``.
        model: the full model; the head is its trainable part.
        head: the head module or its name (default: the smallest submodule holding
            every parameter with ``requires_grad``). Its output must be the model's output.
        cache_dir: keep the training features in a memory-mapped file there.
        batch_size: samples per backbone pass and per head block.
    """
    if not (isinstance(solver, type) and issubclass(solver, InfluenceFunctionModel)):
        raise TypeError(f"solver must be an InfluenceFunctionModel subclass, got {solver!r}")
    return solver(model, loss, regularization, head="auto" if head is None else head, cache_dir=cache_dir,
                  block_size=batch_size, **solver_kwargs)
