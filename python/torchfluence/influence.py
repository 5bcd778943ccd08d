"""The influence-function model interface shared by every solver.

For a test point z and a training point z_j, with H the Hessian (or the
Gauss-Newton matrix) of the mean training loss and lambda the regularization,

    influences[i, j] = grad L(z_test_i)^T (H + lambda I)^-1 grad L(z_j)

(the sign convention of pyDVL). Up-weighting z_j by a small eps changes the
test loss by about -eps * influences[i, j], so a positive value means z_j is
*helpful* to z_test_i (it lowers the loss) and a negative one *harmful*.
Koh & Liang's I_up,loss is the negative of this number.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._data import Batches, check_pair, chunks, count_samples, iterate_batches
from ._functional import LossFn, ModelFunctions
from .capture import capture, find_layers
from .fused import psg_dot
from .topk import StreamingTopK, influence_block

SecondOrder = Literal["hessian", "gauss_newton"]
Mode = Literal["up", "perturbation"]


@dataclass
class TopKInfluences:
    """The k most helpful and most harmful training points for each test point.

    Attributes:
        helpful_indices, helpful_values: (n_test, k), largest influence first.
        harmful_indices, harmful_values: (n_test, k), most negative first.
    Indices count training samples in the order the loader yields them.
    """

    helpful_indices: Tensor
    helpful_values: Tensor
    harmful_indices: Tensor
    harmful_values: Tensor


@dataclass
class FusedPlan:
    """Captured layers scored by the fused kernel, and the other parameters (flat indices) by torch.func."""

    layers: list
    rest: Optional[ModelFunctions]
    rest_index: Optional[Tensor]


class InfluenceFunctionModel(ABC):
    """Base class: curvature from training data, solves, and scores.

    Args:
        model: a trained ``nn.Module`` (call ``model.eval()`` first).
        loss: ``loss(outputs, targets)`` returning the mean loss of the batch.
        regularization: lambda >= 0 added to the curvature's diagonal.
        params: names of the parameters to use (default: all with ``requires_grad``).
        second_order: ``"hessian"`` or ``"gauss_newton"`` (the generalised
            Gauss-Newton matrix J^T H_out J, positive semi-definite for convex losses).
        dtype: computation dtype, float32 (default) or float64.
        block_size: samples per per-sample-gradient block; bounds memory at
            about block_size x num_params values.
        progress: show tqdm progress bars on long loops.
        fused: for the parameters of captured layers (``nn.Linear``, ``nn.Conv2d``
            and registered types), score with the fused per-sample-gradient kernel
            (:func:`torchfluence.fused.psg_dot`) instead of materialised per-sample
            gradients, and form per-sample gradients as ``g a^T`` from one
            forward/backward per block instead of vmap; the other parameters still
            go through ``torch.func``. Needs a loss that is the mean of per-sample losses.
    """

    def __init__(self, model: nn.Module, loss: LossFn, regularization: float = 0.0, *,
                 params: Optional[Sequence[str]] = None, second_order: SecondOrder = "hessian",
                 dtype: torch.dtype = torch.float32, block_size: int = 256, progress: bool = False,
                 fused: bool = True) -> None:
        check_regularization(regularization)
        if second_order not in ("hessian", "gauss_newton"):
            raise ValueError(f"second_order must be 'hessian' or 'gauss_newton', got {second_order!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.regularization = float(regularization)
        self.second_order = second_order
        self.block_size = block_size
        self.progress = progress
        self.functions = ModelFunctions(model, loss, params, dtype)
        self.fused = fused
        self._fused_plan: Optional[FusedPlan] = None
        self.n_train: Optional[int] = None
        self._train_data: Optional[Batches] = None

    # -- properties ---------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.functions.num_params

    @property
    def is_fitted(self) -> bool:
        return self.n_train is not None

    @property
    def device(self) -> torch.device:
        return self.functions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.functions.dtype

    # -- fitting ------------------------------------------------------------------------------------
    def fit(self, train_data: Batches) -> "InfluenceFunctionModel":
        """Computes what the solver needs from the training data (a DataLoader of (x, y)).

        The curvature is that of the mean training loss: each batch's Hessian is
        weighted by its size, so a short last batch counts for what it holds.
        """
        self.n_train = count_samples(train_data, "train_data")
        x, y = next(iterate_batches(train_data, "train_data"))
        self.functions.check_loss(x, y)
        self._train_data = train_data
        self._fit(train_data)
        return self

    def _fit(self, train_data: Batches) -> None:  # noqa: B027 - optional hook
        """Solver-specific work at fit time (default: none)."""

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(train_loader) first")

    # -- curvature ----------------------------------------------------------------------------------
    def batch_curvature_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Curvature of one batch's mean loss times each row of `vectors` (k, p) -> (k, p)."""
        fn = self.functions.hvp if self.second_order == "hessian" else self.functions.ggn_vp
        return fn(vectors, x, y)

    def curvature_vp(self, vectors: Tensor, data: Optional[Batches] = None) -> Tensor:
        """H times each row of `vectors` (k, p) over all training data, without regularization."""
        data = self._train_data if data is None else data
        total = torch.zeros_like(vectors)
        for x, y in iterate_batches(data, "train_data"):
            for _, xb, yb in chunks(x, y, self.block_size):
                total += (xb.shape[0] / self.n_train) * self.batch_curvature_vp(vectors, xb, yb)
        return total

    # -- gradients ----------------------------------------------------------------------------------
    def grads(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample gradients of the loss, (n, p), computed block_size samples at a time."""
        check_pair(x, y)
        out = torch.empty(x.shape[0], self.num_params, dtype=self.dtype, device=self.device)
        plan = self.fused_plan()
        for start, xb, yb in chunks(x, y, self.block_size):
            rows = out[start:start + xb.shape[0]]
            if plan is None:
                rows.copy_(self.functions.per_sample_grads(xb, yb))
                continue
            # Captured layers: one forward/backward for the block and g a^T per sample
            # (several times faster than vmap); the other parameters through torch.func.
            capture(self.functions, plan.layers, xb, yb).per_sample_grads(plan.layers, self.num_params, out=rows)
            if plan.rest is not None:
                rows[:, plan.rest_index] = plan.rest.per_sample_grads(xb, yb)
        bad = (~torch.isfinite(out)).any(dim=1)
        if bool(bad.any()):
            raise ValueError(
                f"the loss gradient is NaN or inf for {int(bad.sum())} sample(s) (first: sample "
                f"{int(bad.nonzero()[0])}); check the inputs and the model for overflow")
        return out

    # -- solving ------------------------------------------------------------------------------------
    @abstractmethod
    def solve(self, vectors: Tensor) -> Tensor:
        """(H + lambda I)^-1 times each row of `vectors`, (k, p) -> (k, p)."""

    def influence_factors(self, x_test: Tensor, y_test: Tensor) -> Tensor:
        """Preconditioned test gradients (H + lambda I)^-1 grad L(z_test), (n_test, p)."""
        self._require_fitted()
        return self.solve(self.grads(x_test, y_test))

    # -- scores -------------------------------------------------------------------------------------
    def influences(self, x_test: Tensor, y_test: Tensor, x: Optional[Tensor] = None,
                   y: Optional[Tensor] = None, mode: Mode = "up") -> Tensor:
        """Influence of each (x, y) on each test point.

        Args:
            x_test, y_test: (n_test, ...) test inputs and targets.
            x, y: (n, ...) training inputs and targets (default: the test points).
            mode: ``"up"`` (up-weighting) or ``"perturbation"`` (input perturbation).

        Returns:
            (n_test, n) for ``"up"``; (n_test, n, *x.shape[1:]) for ``"perturbation"``.
        """
        if (x is None) != (y is None):
            raise ValueError("x and y must be given together (or both left out to use the test points)")
        check_mode(mode)
        factors = self.influence_factors(x_test, y_test)
        if x is None:
            x, y = x_test, y_test
        return self.influences_from_factors(factors, x, y, mode=mode)

    def influences_from_factors(self, factors: Tensor, x: Tensor, y: Tensor, mode: Mode = "up") -> Tensor:
        """Scores of (x, y) against precomputed factors (n_test, p); shapes as in :meth:`influences`."""
        self._require_fitted()
        check_mode(mode)
        check_pair(x, y)
        factors = self._check_factors(factors)
        if mode == "up":
            out = torch.empty(factors.shape[0], x.shape[0], dtype=self.dtype, device=self.device)
            for start, xb, yb in self._chunks(x, y, "scoring"):
                self.score_block(factors, xb, yb, out=out[:, start:start + xb.shape[0]])
            return out
        parts = [self.functions.perturbation_scores(factors, xb, yb) for _, xb, yb in self._chunks(x, y, "scoring")]
        return torch.cat(parts, dim=1)

    def self_influences(self, x: Tensor, y: Tensor) -> Tensor:
        """grad L(z_j)^T (H + lambda I)^-1 grad L(z_j) for each sample, (n,)."""
        self._require_fitted()
        check_pair(x, y)
        out = torch.empty(x.shape[0], dtype=self.dtype, device=self.device)
        for start, xb, yb in self._chunks(x, y, "self-influence"):
            g = self.grads(xb, yb)
            out[start:start + xb.shape[0]] = (g * self.solve(g)).sum(dim=1)
        return out

    def top_k(self, x_test: Tensor, y_test: Tensor, train_data: Batches, k: int = 10) -> TopKInfluences:
        """The k most helpful and harmful training points per test point, streamed.

        Training gradients are computed block by block and merged into running
        top-k lists by the fused kernel, so the (n_test, n_train) matrix is never held.
        """
        factors = self.influence_factors(x_test, y_test)
        state = StreamingTopK(factors.shape[0], k, device=self.device, dtype=self.dtype)
        plan = self.fused_plan()
        for x, y in tqdm(iterate_batches(train_data, "train_data"), desc="top-k", disable=not self.progress):
            for _, xb, yb in chunks(x, y, self.block_size):
                if plan is None:
                    state.update(factors, self.grads(xb, yb))
                else:
                    state.update_scores(self.score_block(factors, xb, yb))
        res = state.result()
        return TopKInfluences(res.largest_indices, res.largest_values, res.smallest_indices, res.smallest_values)

    def score_block(self, factors: Tensor, x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``factors @ grads(x, y).T`` for one block, (n_test, b), fused where the layers allow it."""
        plan = self.fused_plan()
        if out is None:
            out = torch.empty(factors.shape[0], x.shape[0], dtype=self.dtype, device=self.device)
        if plan is None:
            influence_block(factors, self.grads(x, y), out=out)
            return out
        captured = capture(self.functions, plan.layers, x, y)
        out.zero_()
        for layer, activations, output_grads in zip(plan.layers, captured.activations, captured.output_grads):
            psg_dot(layer.matrices(factors), activations, output_grads, out=out)
        if plan.rest is not None:
            out += factors[:, plan.rest_index] @ plan.rest.per_sample_grads(x, y).T
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            query, sample = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"{int(bad.sum())} influence score(s) are NaN or inf (first: test row {query}, sample {sample} of "
                "this block); check the inputs and the model for overflow")
        return out

    def fused_plan(self) -> Optional["FusedPlan"]:
        """How scoring splits the parameters: captured layers (fused) and the rest (torch.func); None: no fusion."""
        if not self.fused:
            return None
        if self._fused_plan is None:
            layers, missing = find_layers(self.functions)
            rest, rest_index = None, None
            if layers and missing:
                f = self.functions
                rest = ModelFunctions(f.model, f.loss, missing, f.dtype)
                offsets = dict(zip(f.names, torch.tensor([0, *f.sizes]).cumsum(0).tolist()))
                sizes = dict(zip(f.names, f.sizes))
                rest_index = torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n]) for n in missing])
                rest_index = rest_index.to(self.device)
            self._fused_plan = FusedPlan(layers, rest, rest_index) if layers else FusedPlan([], None, None)
        return self._fused_plan if self._fused_plan.layers else None

    # -- helpers ------------------------------------------------------------------------------------
    def _chunks(self, x: Tensor, y: Tensor, what: str):
        n_blocks = math.ceil(x.shape[0] / self.block_size)
        return tqdm(chunks(x, y, self.block_size), total=n_blocks, desc=what,
                    disable=not self.progress or n_blocks < 2)

    def _check_factors(self, factors: Tensor) -> Tensor:
        if factors.dim() != 2 or factors.shape[1] != self.num_params:
            raise ValueError(
                f"factors must have shape (n_test, {self.num_params}), got {tuple(factors.shape)}")
        return factors.to(device=self.device, dtype=self.dtype)


def check_regularization(value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"regularization must be a finite number >= 0, got {value!r}")


def check_mode(mode: str) -> None:
    if mode not in ("up", "perturbation"):
        raise ValueError(f"mode must be 'up' or 'perturbation', got {mode!r}")
