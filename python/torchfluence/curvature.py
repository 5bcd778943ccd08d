"""Curvature operators: products of one batch's curvature with many vectors.

A solver is handed one operator at construction and never asks how it works:

- :class:`AutogradHessian`: the Hessian of the batch's mean loss (double backward);
- :class:`GaussNewton`: the generalised Gauss-Newton matrix ``J^T H_out J``;
- :class:`EmpiricalFisher`: the mean of per-sample gradient outer products ``(1/n) sum_i g_i g_i^T``;
- :class:`LinearHeadCurvature`: the closed form for an ``nn.Linear`` model with
  cross-entropy, MSE or BCE-with-logits loss (its Hessian equals its
  Gauss-Newton matrix), with no autograd at all.

Kronecker-factored curvature (K-FAC / EK-FAC) is fitted from captured layer
factors instead of products; it lives with its solvers in ``solvers/kfac.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor, nn

from ._functional import ModelFunctions
from .linear_head import linear_head_hvp, loss_kind


class CurvatureOperator(ABC):
    """``vectors (k, p) -> C_batch vectors (k, p)`` for the curvature C of a batch's mean loss."""

    def __init__(self, functions: ModelFunctions) -> None:
        self.functions = functions

    @abstractmethod
    def batch_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """The curvature of the mean loss of (x, y) times each row of `vectors`, (k, p)."""


class AutogradHessian(CurvatureOperator):
    """Exact Hessian-vector products (:meth:`ModelFunctions.hvp`)."""

    def batch_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.functions.hvp(vectors, x, y)

    def reusable(self, x: Tensor, y: Tensor, num_vectors: int) -> Callable[[Tensor], Tensor]:
        """``vectors (k, p) -> H_batch vectors`` for this batch, reusable for many calls.

        The batch's forward pass and the graph of its gradient are built once and
        kept, so later calls only run the vmapped double backward. Chunked for
        `num_vectors` vectors (:mod:`torchfluence.chunking`); the same operations as
        :meth:`batch_vp` with that many vectors.
        """
        return self.functions.hessian_operator(x, y, num_vectors)


class GaussNewton(CurvatureOperator):
    """Generalised Gauss-Newton products ``J^T H_out J v`` (positive semi-definite for convex losses)."""

    def batch_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.functions.ggn_vp(vectors, x, y)


class EmpiricalFisher(CurvatureOperator):
    """The mean of per-sample gradient outer products, ``second_order="empirical_fisher"``.

    For a batch with per-sample loss gradients G (b, p), the product with each row
    of V (k, p) is ``(V G^T) G / b``; over the training data this is
    ``(1/n) sum_i g_i g_i^T``, positive semi-definite for any loss. It differs from
    the generalised Gauss-Newton matrix J^T H_out J (``"gauss_newton"``) except where
    the two coincide (e.g. where the loss's output Hessian equals its output-gradient
    outer product). pyDVL calls it ``SecondOrderMode.GAUSS_NEWTON``.
    """

    def batch_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        grads = self.functions.per_sample_grads(x, y).to(vectors.dtype)  # (b, p)
        return (vectors @ grads.T) @ grads / grads.shape[0]


class LinearHeadCurvature(CurvatureOperator):
    """Closed-form products for a linear model ``logits = X W^T + b`` (see :mod:`torchfluence.linear_head`).

    The logits are linear in the parameters, so the Hessian equals the
    Gauss-Newton matrix and both ``second_order`` choices use this operator.
    """

    def __init__(self, functions: ModelFunctions) -> None:
        super().__init__(functions)
        head: nn.Linear = functions.model
        self.kind = loss_kind(functions.loss)
        params = functions.unflatten(functions.theta)
        self.weight = params.get("weight", head.weight.detach().to(functions.dtype))
        self.bias = None
        if head.bias is not None:
            self.bias = params.get("bias", head.bias.detach().to(functions.dtype))
        self.C, self.d = self.weight.shape
        # Inputs with more than one position per sample (n, T, d) have no closed form here.
        self.fallback = AutogradHessian(functions)

    def batch_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        if x.dim() != 2:
            return self.fallback.batch_vp(vectors, x, y)
        C, d = self.C, self.d
        full = torch.zeros(vectors.shape[0], C, d + (self.bias is not None), dtype=vectors.dtype,
                           device=vectors.device)
        start = 0
        for name in self.functions.names:  # flat vector -> (k, C, d[+1]) with the bias as the last column
            if name == "weight":
                full[..., :d] = vectors[:, start:start + C * d].view(-1, C, d)
                start += C * d
            else:
                full[..., d] = vectors[:, start:start + C]
                start += C
        hv = linear_head_hvp(self.functions.cast_input(x), self.weight, self.bias, full, self.kind)
        parts = [hv[..., :d].reshape(hv.shape[0], C * d) if name == "weight" else hv[..., d]
                 for name in self.functions.names]
        return torch.cat(parts, dim=1)


def curvature_operator(functions: ModelFunctions, second_order: str) -> CurvatureOperator:
    """The operator for `functions`: the empirical Fisher when asked, else the linear-head closed form where
    it applies (its Hessian and Gauss-Newton matrix agree), else by `second_order`."""
    if second_order == "empirical_fisher":
        return EmpiricalFisher(functions)
    model = functions.model
    if (isinstance(model, nn.Linear) and type(model).forward is nn.Linear.forward
            and loss_kind(functions.loss) is not None):
        return LinearHeadCurvature(functions)
    if second_order == "gauss_newton":
        return GaussNewton(functions)
    return AutogradHessian(functions)
