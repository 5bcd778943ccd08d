"""Blocked influence assembly with streaming top-k.

Scores ``S @ G.T`` arrive one block of training rows at a time; each block is
merged into running per-query lists of the k largest and k smallest scores, so
ranking millions of training points never holds the (n_query, n_train) matrix.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _ops


class TopKResult(NamedTuple):
    """Per-query extremes of the score matrix, each (n_query, min(k, n_seen)).

    ``largest_values`` is sorted descending, ``smallest_values`` ascending; equal
    values are ordered by lower training index.
    """

    largest_values: Tensor
    largest_indices: Tensor
    smallest_values: Tensor
    smallest_indices: Tensor


class StreamingTopK:
    """Running top-k of the largest and smallest scores for each query row.

    Args:
        n_query: number of query rows.
        k: how many extremes to keep on each side (>= 1).
        device: where the state lives (the inputs' device).
        dtype: dtype of the inputs; the state uses its accumulation dtype
            (float64 for float64 inputs, float32 otherwise).

    Example:
        >>> state = StreamingTopK(len(S), k=10, device=S.device, dtype=S.dtype)
        >>> for G in blocks:                      # G: (b, p)
        ...     state.update(S, G)                # offsets advance automatically
        >>> best = state.result().largest_indices  # (n_query, 10)
    """

    def __init__(self, n_query: int, k: int, *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"StreamingTopK: k must be a positive int, got {k!r}")
        if n_query < 0:
            raise ValueError(f"StreamingTopK: n_query must be >= 0, got {n_query}")
        self.n_query, self.k = n_query, k
        self.device = torch.device(device)
        self.input_dtype = dtype
        acc = _ops.accumulation_dtype(dtype)
        self.largest_values = torch.full((n_query, k), -torch.inf, dtype=acc, device=self.device)
        self.smallest_values = torch.full((n_query, k), torch.inf, dtype=acc, device=self.device)
        self.largest_indices = torch.full((n_query, k), -1, dtype=torch.int64, device=self.device)
        self.smallest_indices = torch.full((n_query, k), -1, dtype=torch.int64, device=self.device)
        self.status = torch.zeros(3, dtype=torch.int64, device=self.device)
        # "cuda" and "cuda:0" name the same device but compare unequal: keep the resolved one.
        self.device = self.status.device
        self.n_seen = 0  # training rows merged so far; the default offset of the next block

    def update(self, S: Tensor, G: Tensor, offset: Optional[int] = None,
               out: Optional[Tensor] = None) -> Optional[Tensor]:
        """Merges the block ``S @ G.T`` (rows ``offset .. offset + len(G)``) into the state.

        Args:
            S: (n_query, p) query vectors, same for every block.
            G: (b, p) training vectors of this block.
            offset: global index of G's first row; defaults to the rows seen so far.
            out: optional (n_query, b) tensor that receives the block's scores.

        Returns:
            ``out`` (filled) or None.
        """
        _ops.check_block_inputs(S, G)
        if S.shape[0] != self.n_query:
            raise ValueError(f"StreamingTopK.update: S must have {self.n_query} rows, got {S.shape[0]}")
        if S.device != self.device or S.dtype != self.input_dtype:
            raise ValueError(
                f"StreamingTopK.update: expected inputs of dtype {self.input_dtype} on {self.device}, "
                f"got {S.dtype} on {S.device}"
            )
        offset = self.n_seen if offset is None else int(offset)
        if offset < 0:
            raise ValueError(f"StreamingTopK.update: offset must be >= 0, got {offset}")
        if out is not None:
            _check_out(out, (S.shape[0], G.shape[0]), _ops.accumulation_dtype(S.dtype), S.device)
        fused_limit = _ops.max_fused_topk(S.device)
        if fused_limit is None or self.k <= fused_limit:
            _ops.influence_block_update(
                S, G, offset, self.largest_values, self.largest_indices,
                self.smallest_values, self.smallest_indices, self.status, out,
            )
        else:
            # k beyond what the CUDA epilogue keeps on chip: materialise this block only.
            block = out if out is not None else torch.empty(
                S.shape[0], G.shape[0], dtype=self.largest_values.dtype, device=S.device)
            empty = self.largest_values[:, :0]
            empty_idx = self.largest_indices[:, :0]
            _ops.influence_block_update(S, G, offset, empty, empty_idx, empty, empty_idx, self.status, block)
            self._merge_dense(block, offset)
        self.n_seen = max(self.n_seen, offset + G.shape[0])
        return out

    def update_scores(self, block: Tensor, offset: Optional[int] = None) -> None:
        """Merges precomputed scores (n_query, b) for rows ``offset .. offset + b`` into the state.

        Raises ValueError on any NaN or inf score, naming the query and training index.
        """
        if block.dim() != 2 or block.shape[0] != self.n_query:
            raise ValueError(f"StreamingTopK.update_scores: block must have shape ({self.n_query}, b), "
                             f"got {tuple(block.shape)}")
        offset = self.n_seen if offset is None else int(offset)
        bad = ~torch.isfinite(block)
        if bool(bad.any()):
            query, column = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"StreamingTopK.update_scores: {int(bad.sum())} influence score(s) are NaN or inf "
                             f"(e.g. query {query}, training index {offset + column})")
        self._merge_dense(block.to(self.largest_values.dtype), offset)
        self.n_seen = max(self.n_seen, offset + block.shape[1])

    def _merge_dense(self, block: Tensor, offset: int) -> None:
        index = torch.arange(offset, offset + block.shape[1], device=block.device).expand_as(block)
        finite = torch.isfinite(block)
        for largest in (True, False):
            values = self.largest_values if largest else self.smallest_values
            indices = self.largest_indices if largest else self.smallest_indices
            fill = -torch.inf if largest else torch.inf
            cand_v = torch.cat([values, torch.where(finite, block, fill)], dim=1)
            cand_i = torch.cat([indices, torch.where(finite, index, -1)], dim=1)
            new_v, new_i = select_topk(cand_v, cand_i, self.k, largest)
            values.copy_(new_v)
            indices.copy_(new_i)

    def result(self) -> TopKResult:
        """Returns the top-k so far, trimmed to the rows seen.

        Raises:
            ValueError: if any merged score was NaN or inf (a NaN gradient would
                otherwise silently fall out of the ranking).
        """
        _ops.raise_if_nonfinite(self.status)
        keep = min(self.k, self.n_seen)
        return TopKResult(
            self.largest_values[:, :keep], self.largest_indices[:, :keep],
            self.smallest_values[:, :keep], self.smallest_indices[:, :keep],
        )


def select_topk(values: Tensor, indices: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Top-k along dim 1 by (value, then lower index); index -1 entries sort last.

    Args:
        values, indices: (n, m) candidates.
    Returns:
        (n, min(k, m)) values and indices.
    """
    # Two stable sorts: by index ascending, then by value; ties keep index order.
    order = torch.argsort(torch.where(indices < 0, torch.iinfo(torch.int64).max, indices), dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = torch.argsort(values, dim=1, descending=largest, stable=True)
    order = order[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def _check_out(out: Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"influence_block: out must be a {shape} {dtype} tensor on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


class InfluenceBlock(NamedTuple):
    """What :func:`influence_block` produced: the score block and/or the top-k state."""

    scores: Optional[Tensor]
    topk: Optional[StreamingTopK]


def influence_block(
    S: Tensor,
    G: Tensor,
    *,
    offset: int = 0,
    topk: Union[None, int, StreamingTopK] = None,
    out: Optional[Tensor] = None,
) -> InfluenceBlock:
    """One block of the influence matrix, ``S @ G.T``, fused with top-k selection.

    Args:
        S: (n_query, p) preconditioned query gradients.
        G: (b, p) a block of training gradients; row r has global index ``offset + r``.
        offset: global index of ``G``'s first row (int64: may exceed 2**31).
        topk: None to return the scores only; an int k to start a new
            :class:`StreamingTopK`; or an existing state to merge this block into.
        out: optional (n_query, b) tensor for the scores. When ``topk`` is given
            and ``out`` is None, the score block is never materialised.

    Returns:
        ``InfluenceBlock(scores, topk)``: scores is (n_query, b) in float32
        (float64 for float64 inputs) or None; topk is the updated state or None.

    Raises:
        ValueError: on shape/dtype/device mismatch, or (immediately when only scores
            are asked for, else at ``topk.result()``) if any score is NaN or inf.
    """
    if topk is None:
        if out is None:
            return InfluenceBlock(influence_scores(S, G), None)
        _ops.check_block_inputs(S, G)
        _check_out(out, (S.shape[0], G.shape[0]), _ops.accumulation_dtype(S.dtype), S.device)
        _ops.fill_scores(S, G, offset, out)
        return InfluenceBlock(out, None)
    if isinstance(topk, int):
        _ops.check_block_inputs(S, G)
        topk = StreamingTopK(S.shape[0], topk, device=S.device, dtype=S.dtype)
    elif not isinstance(topk, StreamingTopK):
        raise TypeError(f"influence_block: topk must be None, an int or a StreamingTopK, got {type(topk).__name__}")
    topk.update(S, G, offset=offset, out=out)
    return InfluenceBlock(out, topk)


def influence_scores(S: Tensor, G: Tensor) -> Tensor:
    """The full score block ``S @ G.T``, (n_query, b), rejecting NaN/inf with a clear error."""
    _ops.check_block_inputs(S, G)
    return _ops.influence_scores(S, G)
