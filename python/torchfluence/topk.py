"""Streaming top-k over blocks of influence scores.

Scores arrive one block of training samples at a time; each block is merged
into running per-query lists of the k largest and k smallest scores by the
compiled ``topk_merge`` op, so ranking millions of training points never holds
the (n_query, n_train) matrix. The order is total (larger value first, lower
training index on ties), so the result does not depend on the block sizes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import ops
from .budget import score_chunk_columns
from .checks import check_finite
from .precision import matmul_float32


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
        fused: compute ``S @ G.T`` and select in one compiled kernel
            (``influence_block``) in :meth:`update`, instead of a matmul followed
            by ``topk_merge``. Off by default: on the measured CPU shapes the
            matmul route is faster for k <= 32 (``benchmarks/RESULTS.md``).

    Example:
        >>> state = StreamingTopK(len(S), k=10, device=S.device, dtype=S.dtype)
        >>> for G in blocks:                      # G: (b, p)
        ...     state.update(S, G)                # offsets advance automatically
        >>> best = state.result().largest_indices  # (n_query, 10)
    """

    def __init__(self, n_query: int, k: int, *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, fused: bool = False) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"StreamingTopK: k must be a positive int, got {k!r}")
        if isinstance(n_query, bool) or not isinstance(n_query, int) or n_query < 0:
            raise ValueError(f"StreamingTopK: n_query must be an int >= 0, got {n_query!r}")
        self.n_query, self.k, self.fused = n_query, k, fused
        self.input_dtype = dtype
        acc = ops.accumulation_dtype(dtype)
        self.largest_values = torch.full((n_query, k), -torch.inf, dtype=acc, device=device)
        self.smallest_values = torch.full((n_query, k), torch.inf, dtype=acc, device=device)
        self.largest_indices = torch.full((n_query, k), -1, dtype=torch.int64, device=device)
        self.smallest_indices = torch.full((n_query, k), -1, dtype=torch.int64, device=device)
        self.status = torch.zeros(3, dtype=torch.int64, device=device)
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
        ops.check_block_inputs(S, G)
        if S.shape[0] != self.n_query or S.device != self.device or S.dtype != self.input_dtype:
            raise ValueError(f"StreamingTopK.update: S must be ({self.n_query}, p) {self.input_dtype} on "
                             f"{self.device}, got {tuple(S.shape)} {S.dtype} on {S.device}")
        offset = self._offset(offset)
        if out is not None:
            _check_out(out, (S.shape[0], G.shape[0]), self.largest_values.dtype, self.device)
        limit = ops.max_fused_topk(S.device, S.dtype)
        if self.fused and (limit is None or self.k <= limit):
            ops.influence_block_update(S, G, offset, self.largest_values, self.largest_indices,
                                       self.smallest_values, self.smallest_indices, self.status, out)
        else:
            # Column chunks whose scores fit in half the L2 cache: the merge reads each chunk
            # from L2 right after the GEMM wrote it, instead of the whole block back from memory.
            step = score_chunk_columns(S.shape[0], S.device) or max(1, G.shape[0])
            for start in range(0, G.shape[0], step):
                scores = block_scores(S, G[start:start + step])
                if out is not None:
                    out[:, start:start + scores.shape[1]].copy_(scores)
                self._merge(scores, offset + start)
        self.n_seen = max(self.n_seen, offset + G.shape[0])
        return out

    def update_scores(self, block: Tensor, offset: Optional[int] = None) -> None:
        """Merges precomputed scores (n_query, b) for rows ``offset .. offset + b`` into the state.

        NaN or inf scores are never ranked: :meth:`result` raises, naming the first.
        """
        if not isinstance(block, Tensor) or block.dim() != 2 or block.shape[0] != self.n_query:
            got = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
            raise ValueError(f"StreamingTopK.update_scores: block must have shape ({self.n_query}, b), got {got}")
        offset = self._offset(offset)
        self._merge(block.to(device=self.device, dtype=self.largest_values.dtype), offset)
        self.n_seen = max(self.n_seen, offset + block.shape[1])

    def state_dict(self) -> dict[str, Tensor]:
        """The running state as tensors, for checkpoints.

        Returns:
            ``largest_values``, ``largest_indices``, ``smallest_values``, ``smallest_indices``
            (each (n_query, k)), ``status`` (3,) (the non-finite counter) and ``n_seen``
            (a 0-d int64 tensor); the tensors are the live state, not copies.
        """
        return {"largest_values": self.largest_values, "largest_indices": self.largest_indices,
                "smallest_values": self.smallest_values, "smallest_indices": self.smallest_indices,
                "status": self.status, "n_seen": torch.tensor(self.n_seen, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restores a state saved by :meth:`state_dict` (copied onto this state's device).

        Raises:
            ValueError: when a tensor is missing or its shape or dtype differs from this state's.
        """
        for name, mine in self.state_dict().items():
            value = state.get(name)
            if not isinstance(value, Tensor) or value.shape != mine.shape or value.dtype != mine.dtype:
                got = (f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor)
                       else type(value).__name__)
                raise ValueError(f"StreamingTopK.load_state_dict: {name} must be a {tuple(mine.shape)} "
                                 f"{mine.dtype} tensor, got {got}")
        for name, mine in self.state_dict().items():
            if name != "n_seen":
                mine.copy_(state[name])
        n_seen = int(state["n_seen"])
        if n_seen < 0:
            raise ValueError(f"StreamingTopK.load_state_dict: n_seen must be >= 0, got {n_seen}")
        self.n_seen = n_seen

    def _offset(self, offset: Optional[int]) -> int:
        offset = self.n_seen if offset is None else int(offset)
        if offset < 0:
            raise ValueError(f"StreamingTopK: offset must be >= 0, got {offset}")
        return offset

    def _merge(self, scores: Tensor, offset: int) -> None:
        ops.topk_merge(scores, offset, self.largest_values, self.largest_indices, self.smallest_values,
                       self.smallest_indices, self.status)

    def result(self) -> TopKResult:
        """Returns the top-k so far, trimmed to the rows seen.

        Raises:
            ValueError: if any merged score was NaN or inf (a NaN gradient would
                otherwise silently fall out of the ranking).
        """
        ops.raise_if_nonfinite(self.status, "influence scores")
        keep = min(self.k, self.n_seen)
        return TopKResult(self.largest_values[:, :keep], self.largest_indices[:, :keep],
                          self.smallest_values[:, :keep], self.smallest_indices[:, :keep])


def top_k_of_scores(scores: Tensor, k: int, offset: int = 0) -> TopKResult:
    """The exact top-k of a held (n_query, n) score matrix, in :class:`StreamingTopK`'s order.

    The k largest (descending) and k smallest (ascending) scores of each row, equal
    values ordered by lower column index, read in one pass by the compiled
    ``topk_merge`` op; what a streamed :meth:`InfluenceFunctionModel.top_k` returns for
    the same scores, without scoring the training data again.

    Args:
        scores: (n_query, n) float tensor (float64 stays float64, other dtypes are ranked in float32).
        k: how many on each side, 1 <= k <= n.
        offset: index of column 0 in the returned indices.

    Returns:
        :class:`TopKResult` of (n_query, k) tensors on `scores`' device.

    Raises:
        ValueError: on a bad shape or k, or if any score is NaN or inf (naming the first).
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        got = f"{tuple(scores.shape)} {scores.dtype}" if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"top_k_of_scores: scores must be a 2-D floating tensor (n_query, n), got {got}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"top_k_of_scores: k must be an int in [1, n] = [1, {scores.shape[1]}], got {k!r}")
    state = StreamingTopK(scores.shape[0], k, device=scores.device, dtype=scores.dtype)
    state.update_scores(scores, offset)
    return state.result()


def block_scores(S: Tensor, G: Tensor) -> Tensor:
    """``S @ G.T`` in the accumulation dtype, (n_query, b); half inputs are multiplied in float32.

    Scores are never rounded to 16 bits: a top-k over near-equal scores would
    otherwise be decided by rounding.
    """
    return matmul_float32(S, G.T)


def _check_out(out: Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, Tensor) or tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"out must be a {shape} {dtype} tensor on {device}, got {got}")


class InfluenceBlock(NamedTuple):
    """What :func:`influence_block` produced: the score block and/or the top-k state."""

    scores: Optional[Tensor]
    topk: Optional[StreamingTopK]


def influence_block(S: Tensor, G: Tensor, *, offset: int = 0, topk: Union[None, int, StreamingTopK] = None,
                    out: Optional[Tensor] = None) -> InfluenceBlock:
    """One block of the influence matrix, ``S @ G.T``, optionally merged into a streaming top-k.

    Args:
        S: (n_query, p) preconditioned query gradients.
        G: (b, p) a block of training gradients; row r has global index ``offset + r``.
        offset: global index of ``G``'s first row (int64: may exceed 2**31).
        topk: None to return the scores only; an int k to start a new
            :class:`StreamingTopK`; or an existing state to merge this block into.
        out: optional (n_query, b) tensor for the scores. When ``topk`` is given
            and ``out`` is None, the scores are not returned.

    Returns:
        ``InfluenceBlock(scores, topk)``: scores is (n_query, b) in float32
        (float64 for float64 inputs) or None; topk is the updated state or None.

    Raises:
        ValueError: on shape/dtype/device mismatch, or (immediately when only scores
            are asked for, else at ``topk.result()``) if any score is NaN or inf.
    """
    if topk is None:
        scores = influence_scores(S, G, offset)
        if out is None:
            return InfluenceBlock(scores, None)
        _check_out(out, tuple(scores.shape), scores.dtype, scores.device)
        out.copy_(scores)
        return InfluenceBlock(out, None)
    if isinstance(topk, bool) or not isinstance(topk, (int, StreamingTopK)):
        raise TypeError(f"influence_block: topk must be None, an int or a StreamingTopK, got {type(topk).__name__}")
    if isinstance(topk, int):
        ops.check_block_inputs(S, G)
        topk = StreamingTopK(S.shape[0], topk, device=S.device, dtype=S.dtype)
    topk.update(S, G, offset=offset, out=out)
    return InfluenceBlock(out, topk)


def influence_scores(S: Tensor, G: Tensor, offset: int = 0) -> Tensor:
    """The full score block ``S @ G.T``, (n_query, b), rejecting NaN/inf with an error naming the sample."""
    ops.check_block_inputs(S, G)
    scores = block_scores(S, G)
    check_finite(scores, "influence scores", offset, sample_dim=1)
    return scores
