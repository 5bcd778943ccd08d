"""Block-diagonal curvature: one solver per block of parameters, fitted on the same data.

:class:`BlockDiagonal` is mixed in before a solver's algorithm class
(``class DirectInfluence(BlockDiagonal, _DirectSolve)``); it gives the solver the
``block_structure=`` argument. Without one (the default) every call goes straight to
the algorithm over all parameters, exactly as without the mixin. With one
(:mod:`torchfluence.parameter_blocks`), each block gets its own solver of the same
class on that block's parameters alone, with its own regularization; the solver
itself holds every parameter, so its flat vectors (gradients, factors) are laid out
as without blocks, and its :meth:`~BlockDiagonal.solve` hands each block's columns
to that block's solver. Every score is then the sum over blocks of

    g_test,B^T (H_BB + lambda_B I)^-1 g_B,

the curvature restricted to each block (cross-block terms dropped).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from ..contract import SolverOptions, option
from ..data import SampleBlock
from ..parameter_blocks import (BlockStructure, Ranges, Regularization, block_regularization, column_ranges,
                                gather_columns, resolve_blocks, scatter_columns, smallest_regularization)
from ..scoring import run_blocks
from ..sinks import DenseSink

if TYPE_CHECKING:
    from ..data import Samples
    from ..influence import InfluenceFunctionModel


@dataclass(frozen=True)
class BlockOptions(SolverOptions):
    """The option of every solver that mixes in :class:`BlockDiagonal`: its blocks decide its fitted state."""

    block_structure: Any = option(fit=True, doc="None (the full curvature), layer, parameter, full, or "
                                                "{block name: [parameter names]}")


def _refuse_mapping(regularization: Any) -> None:
    if isinstance(regularization, Mapping):
        raise ValueError(f"regularization={dict(regularization)!r}: a lambda per block needs "
                         "block_structure=; without blocks pass one number")


class BlockScores:
    """Mixin: each block's share of the factors and of the scores (pyDVL's composable API).

    A score is linear in the query factor, and the factor's columns of a block carry that
    block's term ``g_test,B^T (H_BB + lambda_B I)^-1 g_B``, so a block's scores are those of
    the factors with every other block's columns zeroed. Summed over blocks they are
    :meth:`influences`. In mode "up" all blocks are scored from one pass over the data. The class names its blocks' columns in :meth:`_score_columns`.
    """

    def _score_columns(self) -> dict[str, Ranges]:
        """{block name: [(start, stop) columns of the flat parameter vector]}."""
        raise NotImplementedError

    def influence_factors_by_block(self, x_test: Tensor, y_test: Tensor) -> dict[str, Tensor]:
        """Each block's columns of :meth:`influence_factors`: ``{block name: (n_test, p_block)}``."""
        factors = self.influence_factors(x_test, y_test)
        return {name: gather_columns(factors, ranges) for name, ranges in self._score_columns().items()}

    def influences_from_factors_by_block(self, factors: Mapping[str, Tensor], x: Tensor, y: Tensor,
                                         mode: Any = "up") -> dict[str, Tensor]:
        """Each block's scores of (x, y) against its factors ``{block name: (n_test, p_block)}``.

        Returns:
            ``{block name: (n_test, n)}`` for ``"up"``; ``(n_test, n, *x.shape[1:])`` per block for
            ``"perturbation"``.
        """
        columns = self._score_columns()
        if set(factors) != set(columns):
            raise ValueError(f"factors must have one entry per block {list(columns)}, got {list(factors)}")
        if getattr(mode, "value", mode) == "up":
            return self._up_scores_by_block(factors, columns, x, y)
        out = {}
        for name, ranges in columns.items():
            block = factors[name]
            full = torch.zeros(block.shape[0], self.num_params, dtype=block.dtype, device=block.device)
            scatter_columns(full, ranges, block)
            out[name] = self.influences_from_factors(full, x, y, mode=mode)
        return out

    def _up_scores_by_block(self, factors: Mapping[str, Tensor], columns: dict[str, Ranges], x: Tensor,
                            y: Tensor) -> dict[str, Tensor]:
        """Every block's mode-"up" scores from one pass over (x, y): each block's gradient columns
        against its factors, ``{block name: (n_test, n)}``."""
        self._require_fitted()
        parts = {}
        for name, ranges in columns.items():
            width = sum(stop - start for start, stop in ranges)
            block = factors[name]
            if not isinstance(block, Tensor) or block.dim() != 2 or block.shape[1] != width:
                got = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
                raise ValueError(f"factors[{name!r}] must have shape (n_test, {width}), got {got}")
            parts[name] = block.to(device=self.device, dtype=self.dtype)
        counts = {part.shape[0] for part in parts.values()}
        if len(counts) != 1:
            raise ValueError(f"factors must have the same number of test points in every block, got {sorted(counts)}")
        samples = self._scored_samples(x, y)
        sink = DenseSink((len(parts), counts.pop(), samples.count()), dtype=self.dtype, device=self.device)

        def score(block: SampleBlock) -> Tensor:
            g = self.source.grads(block.x, block.y)  # once per block, whatever the number of blocks
            return torch.stack([part @ gather_columns(g, columns[name]).T for name, part in parts.items()])

        run_blocks(samples, score, [sink], "influence scores by block", self.runtime)
        return dict(zip(parts, sink.result()))

    def influences_by_block(self, x_test: Tensor, y_test: Tensor, x: Optional[Tensor] = None,
                            y: Optional[Tensor] = None, mode: Any = "up") -> dict[str, Tensor]:
        """Each block's share of :meth:`influences` (x, y default to the test points):
        ``{block name: (n_test, n)}`` for ``"up"``."""
        if (x is None) != (y is None):
            raise ValueError("x and y must be given together (or both left out to use the test points)")
        if x is None:
            x, y = x_test, y_test
        return self.influences_from_factors_by_block(self.influence_factors_by_block(x_test, y_test), x, y,
                                                     mode=mode)


class BlockDiagonal(BlockScores):
    """Mixin: ``block_structure=`` for a solver class (see the module's docstring).

    Attributes (with a block structure; None without):
        block_structure: the block structure as given (an option of the solver).
        blocks: ``{block name: [parameter names]}``, each block's parameters in the flat order.
        block_columns: ``{block name: [(start, stop), ...]}``, each block's columns of the flat vector.
        block_regularization: ``{block name: lambda}``; :attr:`regularization` is the same dict.

    The blocks' solvers (:attr:`block_solvers`) are built at the first fit (or load), from
    the solver's options; a block's fitted state is saved under ``"block/<name>/"``.
    """

    block_structure: Optional[BlockStructure]
    blocks: Optional[dict[str, list[str]]]
    block_columns: Optional[dict[str, Ranges]]
    block_regularization: Optional[dict[str, float]]

    def __init__(self, model: Any, loss: Any, regularization: Regularization = 0.0, *args: Any,
                 block_structure: Optional[BlockStructure] = None, **kwargs: Any) -> None:
        self.block_structure = block_structure
        self.blocks = self.block_columns = self.block_regularization = None
        self._block_solvers: Optional[dict[str, InfluenceFunctionModel]] = None
        if block_structure is None:
            _refuse_mapping(regularization)
            super().__init__(model, loss, regularization, *args, **kwargs)
            return
        # The algorithm's own checks (a lambda > 0 where its inverse divides by it) hold for
        # every block when they hold for the smallest lambda.
        super().__init__(model, loss, smallest_regularization(regularization), *args,
                         block_structure=block_structure, **kwargs)
        names = self.functions.names
        position = {name: i for i, name in enumerate(names)}
        self.blocks = {block: sorted(params, key=position.__getitem__)
                       for block, params in resolve_blocks(block_structure, names).items()}
        self.block_columns = column_ranges(names, self.functions.sizes, self.blocks)
        self.block_regularization = block_regularization(regularization, list(self.blocks))
        self.regularization = dict(self.block_regularization)

    # -- the blocks -------------------------------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        """The blocks' names, in order (empty without a block structure)."""
        return [] if self.blocks is None else list(self.blocks)

    @property
    def block_solvers(self) -> dict[str, InfluenceFunctionModel]:
        """Each block's solver (empty without a block structure)."""
        return {} if self.blocks is None else dict(self._solvers())

    def _solvers(self) -> dict[str, InfluenceFunctionModel]:
        # Built on first use, once a subclass's constructor (which may add options) has finished.
        if self._block_solvers is None:
            solvers = {}
            for name, params in self.blocks.items():
                with _naming_block(name):
                    solvers[name] = self._block_solver(params, self.block_regularization[name])
            self._block_solvers = solvers
        return self._block_solvers

    def _block_solver(self, params: list[str], regularization: float) -> InfluenceFunctionModel:
        """One block's solver, not fitted: the class that mixes this in, on the block's parameters.

        It takes this solver's common and own options (its model functions' model, loss, dtype
        and output transform; in head mode the head), with :meth:`_block_options` on top.
        """
        # The class that mixes BlockDiagonal in: a subclass's constructor may take other arguments.
        cls = next(c for c in type(self).__mro__ if BlockDiagonal in c.__bases__)
        f = self.functions
        sizes = dict(zip(f.names, f.sizes))
        options = {**self.common_options(), **cls.Options.of(self).values(),
                   **self._block_options(sum(sizes[p] for p in params))}
        del options["regularization"]
        options.update(params=params, head=False, block_structure=None, output_transform=f.output_transform)
        return cls(f.model, f.loss, regularization, **options)

    def _score_columns(self) -> dict[str, Ranges]:
        """The blocks' columns; without a block structure, one block ``"full"`` of every column."""
        return dict(self.block_columns) if self.blocks is not None else {"full": [(0, self.num_params)]}

    def _block_options(self, num_params: int) -> dict[str, Any]:
        """Options a block of `num_params` parameters takes in place of the solver's (a rank capped by it)."""
        return {}

    def _after_block_fit(self) -> None:  # noqa: B027 - optional hook
        """Called once every block is fitted or restored (e.g. to assemble a block-diagonal matrix)."""

    # -- the solver's methods, over the blocks ----------------------------------------------------
    def _fit(self, train: Samples) -> None:
        if self.blocks is None:
            return super()._fit(train)
        for name, solver in self._solvers().items():
            with _naming_block(name):
                solver.fit_samples(train)
        self._after_block_fit()

    def solve(self, vectors: Tensor) -> Tensor:
        """(H + lambda I)^-1 times each row, (k, p) -> (k, p); with blocks, block by block."""
        if self.blocks is None:
            return super().solve(vectors)
        self._require_fitted()
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        out = torch.zeros_like(vectors)
        for name, solver in self._solvers().items():
            ranges = self.block_columns[name]
            scatter_columns(out, ranges, solver.solve(gather_columns(vectors, ranges)))
        return out

    def with_regularization(self, regularization: Regularization) -> Any:
        """Sets lambda (with blocks: one number, or ``{block name: lambda}`` for every block) without
        refitting; returns self."""
        if self.blocks is None:
            _refuse_mapping(regularization)
            return super().with_regularization(regularization)
        values = block_regularization(regularization, list(self.blocks))
        if self._block_solvers is not None:
            for name, solver in self._block_solvers.items():
                with _naming_block(name):
                    solver.with_regularization(values[name])
        self.block_regularization = values
        self.regularization = dict(values)
        return self

    # -- the solver contract: fitted state (torchfluence.contract) ----------------------------------
    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """The solver's own state; with blocks, each block's, keyed ``"block/<name>/<key>"``."""
        if self.blocks is None:
            return super().fitted_state()
        tensors, info = {}, {}
        for name, solver in self._solvers().items():
            state, info[name] = solver.fitted_state()
            tensors.update({f"block/{name}/{key}": value for key, value in state.items()})
        return tensors, {"blocks": info}

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        if self.blocks is None:
            return super().restore_fitted_state(tensors, info)
        for name, solver in self._solvers().items():
            prefix = f"block/{name}/"
            state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            with _naming_block(name):
                solver.restore(state, info["blocks"][name], n_train=self.n_train, classes=self._classes,
                               train=self._train)
        self._after_block_fit()


@contextmanager
def _naming_block(name: str) -> Iterator[None]:
    """Prefixes a ValueError raised inside with the block it concerns: ``block '0': ...``."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"block {name!r}: {error}") from error
