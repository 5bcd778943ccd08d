"""Gradient sources: per-sample loss gradients of a block, and their contraction with queries.

A source is chosen once, when a solver is built, from the model's layers:

- :class:`FuncGradients`: ``torch.func`` (vmap of grad) for any parameter;
- :class:`CapturedGradients`: for the parameters of captured layers
  (``nn.Linear``, ``nn.Conv2d``, registered types), each layer's inputs ``A``
  and output gradients ``D`` from one forward/backward of the block; scores are
  contracted from ``(A, D)`` by :func:`torchfluence.fused.psg_dot` without
  per-sample gradients in memory, and any other parameters go through
  ``torch.func``.

In head mode the model a source sees is the head, and its inputs are the
cached backbone features, so the same two sources serve it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import Tensor

from ._functional import ModelFunctions
from ._ops import accumulation_dtype
from .capture import Layer, capture, find_layers
from .fused import psg_dot


class GradientSource(ABC):
    """Per-sample gradients of one block of samples, dense or contracted with queries."""

    def __init__(self, functions: ModelFunctions) -> None:
        self.functions = functions

    @property
    def num_params(self) -> int:
        return self.functions.num_params

    @abstractmethod
    def grads(self, x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Per-sample gradients of the loss, (b, p), written into `out` when given."""

    def scores(self, queries: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``queries @ grads(x, y).T``, (n_query, b), in the accumulation dtype.

        Args:
            queries: (n_query, p) vectors in the computation dtype.
        """
        return queries @ self.grads(x, y).T

    def scores_by_layer(self, queries: Tensor, x: Tensor, y: Tensor) -> Optional[dict[str, Tensor]]:
        """{layer name: (n_query, b)} scores of each captured layer, or None when there are no layers."""
        return None


class FuncGradients(GradientSource):
    """Per-sample gradients of every selected parameter by ``vmap(grad(loss))``."""

    def grads(self, x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        g = self.functions.per_sample_grads(x, y)
        if out is None:
            return g
        out.copy_(g)
        return out


class CapturedGradients(GradientSource):
    """Captured layers from one forward/backward per block; other parameters by ``torch.func``.

    Args:
        functions: the model and loss over the selected parameters.
        layers: the captured layers (non-empty).
        rest: names of the selected parameters outside those layers.
    """

    def __init__(self, functions: ModelFunctions, layers: list[Layer], rest: list[str]) -> None:
        super().__init__(functions)
        self.layers = layers
        self.rest: Optional[ModelFunctions] = None
        self.rest_index: Optional[Tensor] = None
        if rest:
            f = functions
            self.rest = ModelFunctions(f.model, f.loss, rest, f.dtype)
            offsets = dict(zip(f.names, torch.tensor([0, *f.sizes]).cumsum(0).tolist()))
            sizes = dict(zip(f.names, f.sizes))
            index = torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n]) for n in rest])
            self.rest_index = index.to(f.device)

    def grads(self, x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        # g a^T per sample from one forward/backward is several times faster than vmap.
        if out is None:
            out = torch.empty(x.shape[0], self.num_params, dtype=self.functions.dtype, device=self.functions.device)
        capture(self.functions, self.layers, x, y).per_sample_grads(self.layers, self.num_params, out=out)
        if self.rest is not None:
            out[:, self.rest_index] = self.rest.per_sample_grads(x, y)
        return out

    def scores(self, queries: Tensor, x: Tensor, y: Tensor) -> Tensor:
        captured = capture(self.functions, self.layers, x, y)
        out = torch.zeros(queries.shape[0], x.shape[0], dtype=accumulation_dtype(queries.dtype),
                          device=queries.device)
        for layer, a, d in zip(self.layers, captured.activations, captured.output_grads):
            psg_dot(layer.matrices(queries), a, d, out=out)
        if self.rest is not None:
            out += queries[:, self.rest_index] @ self.rest.per_sample_grads(x, y).T
        return out

    def scores_by_layer(self, queries: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.rest is not None:
            raise ValueError("per-layer scores need every selected parameter in a captured layer")
        captured = capture(self.functions, self.layers, x, y)
        return {layer.name: psg_dot(layer.matrices(queries), a, d)
                for layer, a, d in zip(self.layers, captured.activations, captured.output_grads)}


def gradient_source(functions: ModelFunctions, fused: bool) -> GradientSource:
    """The source for `functions`: captured layers when ``fused`` and the model has any, else torch.func."""
    if fused:
        layers, rest = find_layers(functions)
        if layers:
            return CapturedGradients(functions, layers, rest)
    return FuncGradients(functions)
