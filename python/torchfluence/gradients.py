"""Gradient sources: per-sample loss gradients of a block, and their contraction with queries.

A source is chosen once, when a solver is built, from the model's layers:

- :class:`FuncGradients`: ``torch.func`` (vmap of grad) for any parameter;
- :class:`CapturedGradients`: for the parameters of captured layers
  (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, registered types), each layer's
  inputs ``A`` (an embedding's token ids) and output gradients ``D`` from one
  forward/backward of the block; scores are contracted from ``(A, D)`` by
  :func:`torchfluence.captured_scores.psg_dot` without per-sample gradients in memory, and
  any other parameters go through ``torch.func``.

In head mode the model a source sees is the head, and its inputs are the
cached backbone features, so the same two sources serve it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ._functional import ModelFunctions
from .ops import accumulation_dtype
from .capture import Captured, Layer, capture, find_layers
from .captured_scores import psg_dot, score_gradients, score_index_layer, score_layer
from .precision import matmul_float32


@dataclass
class PreparedQueries:
    """Query vectors laid out once for a source's scoring, in the operand dtype of the products.

    Attributes:
        count: number of queries.
        parts: one contiguous (count, width) matrix per part of the parameter vector:
            for :class:`CapturedGradients` one per captured layer (its (d_out, d_in_total)
            matrix flattened; an embedding's (vocabulary, width) weight as stored), then
            the uncaptured parameters; for
            :class:`FuncGradients` the whole vector.
    """

    count: int
    parts: list[Tensor]

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype


Queries = Union[Tensor, PreparedQueries]


class GradientSource(ABC):
    """Per-sample gradients of one block of samples, dense or contracted with queries."""

    _flat_layout = True  # prepared queries are the (n_query, p) vectors themselves

    def __init__(self, functions: ModelFunctions) -> None:
        self.functions = functions

    @property
    def num_params(self) -> int:
        return self.functions.num_params

    @abstractmethod
    def grads(self, x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Per-sample gradients of the loss, (b, p), written into `out` when given."""

    def part_widths(self) -> list[int]:
        """Widths of the parts a :class:`PreparedQueries` holds (they sum to num_params)."""
        return [self.num_params]

    def part_columns(self, queries: Tensor) -> list[Tensor]:
        """The parts of (k, p) vectors, as (k, width) views or copies."""
        return [queries]

    def allocate_queries(self, count: int, dtype: torch.dtype) -> PreparedQueries:
        """Empty prepared queries for `count` vectors, filled with :meth:`write_queries`."""
        device = self.functions.device
        return PreparedQueries(count, [torch.empty(count, w, dtype=dtype, device=device) for w in self.part_widths()])

    def write_queries(self, prepared: PreparedQueries, rows: Tensor, offset: int) -> None:
        """Copies (k, p) vectors into rows ``offset .. offset + k`` of `prepared` (casting to its dtype)."""
        for part, columns in zip(prepared.parts, self.part_columns(rows)):
            part[offset:offset + rows.shape[0]].copy_(columns)

    def prepare(self, queries: Queries, dtype: Optional[torch.dtype] = None) -> PreparedQueries:
        """(n_query, p) vectors laid out for :meth:`scores`, in `dtype` (default: theirs)."""
        if isinstance(queries, PreparedQueries):
            return queries
        dtype = dtype or queries.dtype
        if self._flat_layout and queries.dtype == dtype and queries.is_contiguous():
            return PreparedQueries(queries.shape[0], [queries])  # already in the layout: no copy
        prepared = self.allocate_queries(queries.shape[0], dtype)
        self.write_queries(prepared, queries, 0)
        return prepared

    def score_block(self, queries: Queries, x: Tensor, y: Tensor) -> Tensor:
        """``queries @ grads(x, y).T``, (n_query, b), in the accumulation dtype (float32 for 16-bit operands).

        Args:
            queries: (n_query, p) vectors, or :class:`PreparedQueries` (prepare once, score many blocks).
        """
        q = queries if isinstance(queries, Tensor) else queries.parts[0]
        return matmul_float32(q, self.grads(x, y).to(q.dtype).T)

    def score_block_by_layer(self, queries: Tensor, x: Tensor, y: Tensor) -> Optional[dict[str, Tensor]]:
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
            self.rest = f.subset(rest)
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

    _flat_layout = False  # one matrix per layer, bias as its last column

    def part_widths(self) -> list[int]:
        widths = [layer.d_out * layer.d_in_total for layer in self.layers]
        return widths + ([self.rest_index.numel()] if self.rest is not None else [])

    def part_columns(self, queries: Tensor) -> list[Tensor]:
        # Tied layers (one weight in two modules) each get a copy of its columns.
        parts = [layer.query_rows(queries) for layer in self.layers]
        return parts + ([queries[:, self.rest_index]] if self.rest is not None else [])

    def score_block(self, queries: Queries, x: Tensor, y: Tensor) -> Tensor:
        return self.score_captured(self.prepare(queries), capture(self.functions, self.layers, x, y), x, y)

    def score_captured(self, prepared: PreparedQueries, captured: Captured, x: Tensor, y: Tensor) -> Tensor:
        """(n_query, n) scores of the block (x, y) whose layers' capture is `captured`
        (:func:`~torchfluence.capture.capture` of :attr:`layers`); the rest through torch.func."""
        out = torch.zeros(prepared.count, x.shape[0], dtype=accumulation_dtype(prepared.dtype),
                          device=prepared.parts[0].device)
        for i, (layer, q) in enumerate(zip(self.layers, prepared.parts)):
            if captured.grouped_grads(i) and isinstance(q, Tensor) and q.dtype == captured.output_grads[i].dtype:
                score_gradients(q, lambda start, stop, i=i: captured.layer_grads(i, start, stop), x.shape[0],
                                layer.d_in_total, layer.d_out, out)
                continue
            a, d = captured.activation(i), captured.output_grads[i]
            (score_index_layer if layer.index else score_layer)(q, a, d, out)
        if self.rest is not None:
            rest = prepared.parts[-1]
            out += matmul_float32(rest, self.rest.per_sample_grads(x, y).to(rest.dtype).T)
        return out

    def score_block_by_layer(self, queries: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
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
