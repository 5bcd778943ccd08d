"""LiSSA: the stochastic Neumann-series estimate of the inverse curvature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checks import check_regularization
from ..distributed import all_reduce_sum, is_distributed, local_rows
from ..contract import SolverTraits, option
from ..influence import InfluenceFunctionModel
from .block_diagonal import BlockDiagonal, BlockOptions


@dataclass(frozen=True)
class LissaOptions(BlockOptions):
    """LissaInfluence's own options."""

    maxiter: int = option(doc="recursion steps")
    dampen: float = option(doc="damping of the recursion")
    scale: float = option(doc="scale of the recursion")
    repetitions: int = option(doc="independent recursions averaged")
    seed: Optional[int] = option(doc="seed of the minibatch order")


class _LissaSolve(InfluenceFunctionModel):
    """:class:`LissaInfluence` over all its parameters at once (its algorithm, without blocks)."""

    def __init__(self, *args, maxiter: int = 1000, dampen: float = 0.0, scale: float = 10.0,
                 repetitions: int = 1, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if maxiter < 1:
            raise ValueError(f"maxiter must be >= 1, got {maxiter!r}")
        if not 0 <= dampen < 1:
            raise ValueError(f"dampen must be in [0, 1), got {dampen!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        if repetitions < 1:
            raise ValueError(f"repetitions must be >= 1, got {repetitions!r}")
        self.maxiter, self.dampen, self.scale, self.repetitions = maxiter, dampen, scale, repetitions
        self.seed = seed

    def _minibatches(self, repetition: int) -> Iterator[tuple[Tensor, Tensor]]:
        return self._require_fitted().shuffled_batches(self.seed + repetition)

    def _minibatch_vp(self, h: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """The minibatch's mean curvature times each row of h; with several processes, each takes a slice."""
        if not is_distributed():
            return self.curvature_operator.batch_vp(h, x, y)
        x, y, share = local_rows(x, y)
        part = self.curvature_operator.batch_vp(h, x, y) * share if x.shape[0] else torch.zeros_like(h)
        return all_reduce_sum(part)

    def with_regularization(self, regularization: float) -> "LissaInfluence":
        """Sets lambda (nothing is fitted that depends on it); returns self."""
        self.regularization = check_regularization(regularization)
        return self

    def solve(self, vectors: Tensor) -> Tensor:
        self._require_fitted()
        v = vectors.to(self.dtype)
        total = torch.zeros_like(v)
        bar = tqdm(total=self.repetitions * self.maxiter, desc="lissa", disable=not self.progress)
        for repetition in range(self.repetitions):
            h = v.clone()
            batches = self._minibatches(repetition)
            for step in range(self.maxiter):
                curvature = self._minibatch_vp(h, *next(batches)) + self.regularization * h
                h = v + (1 - self.dampen) * h - curvature / self.scale
                if step % 50 == 0 and not bool(torch.isfinite(h).all()):
                    raise ValueError(
                        f"LiSSA diverged at step {step}: scale={self.scale:g} must exceed the largest "
                        "eigenvalue of H + regularization * I; increase scale")
                bar.update(1)
            if not bool(torch.isfinite(h).all()):
                raise ValueError(f"LiSSA diverged: scale={self.scale:g} is too small; increase it")
            total += h / self.scale
        bar.close()
        return total / self.repetitions

    # -- the solver contract: options and fitted state (torchfluence.contract) -----------------------
    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """Nothing: the fit only records the training data, which a load is given again."""
        return {}, {}

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        pass


class LissaInfluence(BlockDiagonal, _LissaSolve):
    """Linear-time stochastic second-order approximation (Agarwal et al. 2017).

    For all right-hand sides v at once, with minibatches drawn from the training
    data in the loader's order (cycling), runs

        h <- v + (1 - dampen) h - (H_batch + lambda I) h / scale

    for ``maxiter`` steps and returns h / scale, which approximates
    (H + lambda I)^-1 v when ``scale`` exceeds the largest eigenvalue of
    H + lambda I (and ``dampen`` is small). Nothing keeps an autograd graph
    between steps. ``repetitions`` independent runs are averaged. The recursion
    needs independent minibatches, and each repetition different ones, so a
    DataLoader that does not shuffle is read through a shuffling copy (same
    batch size, seeded by ``seed`` and the repetition).

    Args:
        maxiter: recursion depth.
        dampen: damping of the previous estimate, in [0, 1).
        scale: must exceed the largest eigenvalue of H + lambda I.
        repetitions: independent estimates averaged (pytorch-influence-functions' ``r``).
        seed: seeds the minibatch order when the loader does not shuffle.
        block_structure: a block-diagonal H (:mod:`torchfluence.solvers.block_diagonal`):
            each block runs its own recursion on the same minibatches, with its own lambda.
        (others as in :class:`~torchfluence.InfluenceFunctionModel`)
    """

    Options = LissaOptions
    # Every step reads a training minibatch.
    traits = SolverTraits(solve_reads_train_data=True, accepts_block_structure=True)
