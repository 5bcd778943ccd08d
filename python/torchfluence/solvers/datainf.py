"""DataInf: the inverse harmonic mean of rank-one Fisher terms (Kwon et al. 2023).

With per-sample gradients g_i (i = 1..n) the damped empirical Fisher of a
parameter block B is the arithmetic mean of rank-one terms,

    F_B + lambda_B I = (1/n) sum_i (g_iB g_iB^T + lambda_B I).

DataInf swaps the mean and the inverse: it replaces (F_B + lambda_B I)^-1 by the
mean of the inverses of the terms, each in closed form (Sherman-Morrison),

    (1/n) sum_i (g_iB g_iB^T + lambda_B I)^-1 v
        = 1/(n lambda_B) sum_i [ v - (g_iB^T v) / (lambda_B + ||g_iB||^2) g_iB ],

block by block over the parameters (blocks: the parameters of each layer, or the
whole parameter vector). The blocks are solved independently, so the map is
block-diagonal. There is nothing to fit: every solve is one pass over the
training gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..budget import query_rows
from ..checks import check_finite
from ..distributed import all_reduce_count, all_reduce_sum, local_blocks
from ..contract import SolverOptions, SolverTraits, option
from ..influence import InfluenceFunctionModel
from .block_diagonal import BlockScores
from ..parameter_blocks import (BlockStructure, Regularization, block_regularization, column_ranges,
                                gather_columns, resolve_blocks, scatter_columns)


@dataclass(frozen=True)
class DataInfOptions(SolverOptions):
    """InverseHarmonicMeanInfluence's own options."""

    block_structure: Any = option(fit=True, doc="layer, full, parameter, or {block name: [parameter names]}")


class InverseHarmonicMeanInfluence(BlockScores, InfluenceFunctionModel):
    """Influence through DataInf's inverse harmonic mean of the damped empirical Fisher.

    For a block B with damping lambda_B and the n training gradients g_i,

        (F_B + lambda_B I)^-1 v  ~  1/(n lambda_B) sum_i [ v - (g_iB^T v) / (lambda_B + ||g_iB||^2) g_iB ].

    No matrix is built or stored: fitting only records the training data, and
    each call of :meth:`solve` streams the per-sample training gradients once,
    ``block_size`` samples at a time, in O(k p) memory for k vectors. Scoring
    solves the test gradients in as few row blocks as memory allows (one pass
    over the training data per row block); :meth:`self_influences` solves
    ``block_size`` samples per pass, so it costs n / block_size passes.

    The approximation is exact for n = 1 and approaches v / lambda_B as lambda_B
    grows; it is cheap but crude when lambda_B is small next to ||g_i||^2.

    Args:
        regularization: lambda > 0: one number for every block, or a mapping
            {block name: lambda} with an entry for each block (see :attr:`blocks`).
        block_structure: ``"layer"`` (default): one block per module owning
            parameters (the block's name is the module's name, e.g. ``"0"`` or
            ``"encoder.fc"``; a parameter of the root module is a block of its own,
            named after it); ``"full"``: all parameters form one block named
            ``"full"``; ``"parameter"``: one block per parameter tensor; or a mapping
            {block name: [parameter names]} that assigns every selected parameter to
            exactly one block (:mod:`torchfluence.parameter_blocks`).
        (others as in :class:`~torchfluence.InfluenceFunctionModel`; ``second_order``
        and ``curvature`` are not taken: the curvature is the empirical Fisher)
    """

    Options = DataInfOptions
    # A fixed linear map per row, whose every solve streams the training gradients; the curvature is
    # the empirical Fisher, so second_order and curvature are set by the class.
    traits = SolverTraits(accepts_projector=False,
                          projector_refusal="DataInf's blocks are groups of parameters, which a projection mixes; use "
                                            "DirectInfluence or CgInfluence with the projector instead",
                          accepts_block_structure=True,
                          solve_reads_train_data=True, solves_rows_independently=True,
                          fixed_options=("second_order", "curvature"))

    def __init__(self, model, loss, regularization: Regularization, *,
                 block_structure: BlockStructure = "layer", **kwargs) -> None:
        for name in ("second_order", "curvature"):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__} approximates the empirical Fisher and takes no "
                                f"{name} argument")
        super().__init__(model, loss, 0.0, **kwargs)
        blocks = resolve_blocks(block_structure, self.functions.names)
        self._columns = column_ranges(self.functions.names, self.functions.sizes, blocks)
        self.block_structure = block_structure
        self.with_regularization(regularization)

    # -- configuration ----------------------------------------------------------------------------
    @property
    def blocks(self) -> dict[str, list[tuple[int, int]]]:
        """{block name: [(start, stop) column ranges of the flat parameter vector]}, in parameter order."""
        return {name: list(ranges) for name, ranges in self._columns.items()}

    def _score_columns(self) -> dict[str, list[tuple[int, int]]]:
        return self.blocks

    def with_regularization(self, regularization: Regularization) -> InverseHarmonicMeanInfluence:
        """Sets lambda (a number, or {block name: lambda} for every block); returns self, no refit needed."""
        self.block_regularization = block_regularization(regularization, list(self._columns), positive=True,
                                                         why="DataInf divides by it")
        self.regularization = (dict(regularization) if isinstance(regularization, Mapping)
                               else float(regularization))
        return self

    # -- solving ----------------------------------------------------------------------------------
    def solve(self, vectors: Tensor) -> Tensor:
        """The inverse-harmonic-mean approximation of (F + lambda I)^-1 times each row, (k, p) -> (k, p).

        One pass over the training data; blocks of B columns get
        (b V_B - ((V_B G_B^T) / (lambda_B + ||g||^2)) G_B) summed over training
        blocks G (b, p), then divided by n lambda_B.
        """
        train = self._require_fitted()
        if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[1] != self.num_params:
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ValueError(f"vectors must be a (k, {self.num_params}) tensor, got {shape}")
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        out = torch.zeros_like(vectors)
        if vectors.shape[0] == 0:
            return out
        parts = [(ranges, gather_columns(vectors, ranges), self.block_regularization[name])
                 for name, ranges in self._columns.items()]
        n = 0
        for block in tqdm(local_blocks(train), desc="DataInf solve", disable=not self.progress):
            g = self.source.grads(block.x, block.y)  # (b, p)
            check_finite(g, "per-sample gradients", block.offset)
            n += g.shape[0]
            for ranges, v, lam in parts:
                g_b = gather_columns(g, ranges)  # (b, p_B)
                coef = (v @ g_b.T) / (lam + g_b.square().sum(dim=1))  # (k, b)
                scatter_columns(out, ranges, g.shape[0] * v - coef @ g_b, add=True)
            del g
        all_reduce_sum(out)
        n = all_reduce_count(n, out.device)
        for ranges, _, lam in parts:
            for start, stop in ranges:
                out[:, start:stop] /= n * lam
        return out

    def _factor_rows(self) -> int:
        """Test rows per solve: as many as the memory budget allows, each solve being a pass over the data."""
        return query_rows(self.num_params, self.dtype, self.device, copies=3)  # V, V_B, out

    # -- the solver contract: options and fitted state (torchfluence.contract) -----------------------
    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """Nothing: there is no fit beyond recording the training data, which a load is given again."""
        return {}, {}

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        pass

