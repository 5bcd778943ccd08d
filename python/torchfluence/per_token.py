"""Per-token scores: a training sequence's influence on a query, split over its positions.

A captured layer's per-sample gradient is a sum over the positions it is applied to,
``G_j = sum_t D[j, t] A[j, t]^T`` (output gradients times inputs), so the score of
sample j against a preconditioned query Q splits the same way:

    per_token[q, j, t] = sum over captured layers of <Q_layer[q], D[j, t] A[j, t]^T>

and ``sum_t per_token[q, j, t]`` is the sample's influence, exactly. This is
kronfluence's ``compute_per_token_scores``. Each term comes from one position's
activations and output gradients contracted with the query: no per-token gradient
is formed. What a term means:

- It is the part of the influence carried through position t's activations. The
  output gradient ``D[j, t]`` is that of the sample's whole loss, so with attention
  it holds later tokens' loss terms too: a position whose own target is masked
  (``-100``) can still score.
- When positions do not interact (no attention or convolution across tokens), it is
  exactly the score of token t's own loss term.
- Scores are those of the sample's loss as the model's loss gives it: for the
  mean over a sequence's N_j unmasked tokens (the README's language-model loss) they
  are the token-summed loss's scores divided by N_j, and still sum to
  :meth:`~torchfluence.InfluenceFunctionModel.influences`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .budget import temporary_rows
from .capture import Captured, Layer, capture
from .data import SampleBlock
from .gradients import CapturedGradients, PreparedQueries
from .ops import accumulation_dtype
from .scoring import run_blocks
from .sinks import DenseSink


def per_token_scores(im, prepare, x, y) -> Tensor:
    """(n_test, n, T) per-token scores of (x, y) against the factors ``prepare()`` lays out.

    Args:
        im: a fitted :class:`~torchfluence.InfluenceFunctionModel` whose gradient source is captured layers.
        prepare: ``() -> PreparedQueries``, the test factors in the source's layout.
        x, y: (n, T, ...) training sequences and targets (or a dict batch).
    """
    source = _captured_source(im)
    samples = im._scored_samples(x, y)
    first = samples.first_block()
    T = _positions(source.layers, capture(source.functions, source.layers, first.x[:1], first.y[:1]), None)
    prepared = prepare()
    sink = DenseSink((prepared.count, samples.count(), T), dtype=im.dtype, device=im.device, sample_dim=1)
    run_blocks(samples, lambda block: block_scores(source.layers, prepared, block, source, T), [sink],
               "per-token scores", im.runtime, sample_dim=1)
    return sink.result()


def block_scores(layers: list[Layer], prepared: PreparedQueries, block: SampleBlock, source: CapturedGradients,
                 T: int) -> Tensor:
    """(n_query, b, T) per-token scores of one block, summed over the captured layers."""
    captured = capture(source.functions, layers, block.x, block.y)
    _positions(layers, captured, T, block.offset)
    acc = accumulation_dtype(prepared.dtype)
    out = torch.zeros(prepared.count, block.size, T, dtype=acc, device=prepared.parts[0].device)
    for i, (layer, q) in enumerate(zip(layers, prepared.parts)):
        flat = out.view(prepared.count, -1)
        d = captured.output_grads[i].reshape(block.size * T, layer.d_out)
        if layer.index:
            flat += index_position_scores(q, captured.activation(i).reshape(-1), d)
        else:
            a = captured.activation(i).reshape(block.size * T, -1)
            flat += position_scores(q.view(q.shape[0], layer.d_out, layer.d_in_total), a, d)
    return out


def position_scores(Q: Tensor, A: Tensor, D: Tensor) -> Tensor:
    """``s[q, r] = <Q[q], D[r] A[r]^T> = D[r]^T Q[q] A[r]`` for each position r, (n_query, m).

    Args:
        Q: (n_query, d_out, d_in) query matrices; A: (m, d_in) inputs; D: (m, d_out) output
            gradients, one row per (sample, position). Summed in Q's accumulation dtype.

    The query is applied to the narrower side first: the temporary is (rows, n_query, min(d_in, d_out)),
    in chunks of positions within :func:`~torchfluence.budget.temporary_rows`.
    """
    acc = accumulation_dtype(Q.dtype)
    n_query, d_out, d_in = Q.shape
    Q = Q.to(acc)
    # Contract the wider side with Q, keeping the narrower one for the elementwise product.
    if d_out >= d_in:
        wide, narrow, mat = D, A, Q.permute(1, 0, 2).reshape(d_out, n_query * d_in)
    else:
        wide, narrow, mat = A, D, Q.permute(2, 0, 1).reshape(d_in, n_query * d_out)
    k = narrow.shape[1]
    out = torch.empty(n_query, A.shape[0], dtype=acc, device=Q.device)
    step = temporary_rows(n_query * k, Q.device)
    for start in range(0, A.shape[0], step):
        w, v = wide[start:start + step].to(acc), narrow[start:start + step].to(acc)
        out[:, start:start + w.shape[0]] = ((w @ mat).view(-1, n_query, k) * v.unsqueeze(1)).sum(dim=2).T
    return out


def index_position_scores(Q: Tensor, ids: Tensor, D: Tensor) -> Tensor:
    """An embedding's per-position scores ``s[q, r] = Q[q, id[r], :] . D[r]``, (n_query, m).

    Args:
        Q: (n_query, d_in * d_out) queries in the layer's stored layout (one row per index);
        ids: (m,) integer indices; D: (m, d_out) output gradients.
    """
    acc = accumulation_dtype(Q.dtype)
    n_query, d_out = Q.shape[0], D.shape[1]
    rows = Q.view(n_query, -1, d_out)
    out = torch.empty(n_query, ids.shape[0], dtype=acc, device=Q.device)
    step = temporary_rows(n_query * d_out, Q.device)
    for start in range(0, ids.shape[0], step):
        i, d = ids[start:start + step], D[start:start + step].to(acc)
        out[:, start:start + i.shape[0]] = (rows[:, i].to(acc) * d).sum(dim=2)
    return out


def _captured_source(im) -> CapturedGradients:
    """The solver's captured-layer source, or an error saying why per-token scores are not available."""
    source = im.source
    name = type(im).__name__
    if not isinstance(source, CapturedGradients):
        raise ValueError(
            f"{name}: per-token scores come from captured layers' per-position activations and output gradients, "
            f"but this solver's gradients come from {type(source).__name__} (fused=False, a projector or head "
            "mode); use fused=True without a projector")
    if source.rest is not None:
        raise ValueError(
            f"{name}: per-token scores need every selected parameter in a captured layer (nn.Linear, Conv1D, "
            f"nn.Embedding, ...); not captured: {', '.join(source.rest.names)}. Pass params= with the captured "
            "layers' parameters only (K-FAC/EK-FAC leave the others out by default)")
    return source


def _positions(layers: list[Layer], captured: Captured, expected: Optional[int], offset: int = 0) -> int:
    """The number of positions T every layer was applied to; an error if the layers or blocks disagree."""
    counts = {layer.name: g.shape[-2] for layer, g in zip(layers, captured.output_grads)}
    T = next(iter(counts.values())) if expected is None else expected
    bad = {name: t for name, t in counts.items() if t != T}
    if bad:
        where = f"the block at sample {offset}" if expected is not None else "the first sample"
        raise ValueError(
            f"per-token scores need every captured layer applied once per token, at the same T = {T} positions; "
            f"in {where}, layer(s) {bad} have other numbers of positions (a layer called several times, a "
            "convolution's patches, or sequences padded to other lengths per batch); restrict params= to the "
            "layers applied once per token, or pad every batch to one length")
    return T
