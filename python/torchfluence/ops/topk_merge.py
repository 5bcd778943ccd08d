"""topk_merge: precomputed scores merged into the running top-k (csrc/*/topk_merge.*)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._native import _C
from ..checks import nonfinite_error
from . import _common


def _check(scores, offset, state: tuple) -> tuple[int, int]:
    op = "topk_merge"
    _common.check_input(op, "scores", scores, 2, "(n_query, b)", _common.SCORE_DTYPES)
    _common.check_backend(op, scores.device)
    n_query, b = scores.shape
    k = _common.state_k(op, state[0], n_query, scores.dtype, scores.device)
    _common.check_state(op, n_query, k, scores.dtype, scores.device, state)
    _common.check_offset(op, offset, b)
    return n_query, b


@torch.library.custom_op("torchfluence::topk_merge", mutates_args=_common.STATE_NAMES)
def _topk_merge(scores: Tensor, offset: int, largest_values: Tensor, largest_indices: Tensor,
                smallest_values: Tensor, smallest_indices: Tensor, status: Tensor) -> None:
    state = (largest_values, largest_indices, smallest_values, smallest_indices, status)
    n_query, b = _check(scores, offset, state)
    if n_query == 0 or b == 0:
        return
    args = _C.TopKMergeArgs(
        _common.matrix_ref(scores), offset, _common.topk_ref(state), _common.vector_ref(status)
    )
    if scores.device.type == "cpu":
        _C.topk_merge_cpu(args)
        return
    with torch.cuda.device(scores.device):
        workspace = torch.empty(
            _common.cuda_limits()["topk_merge_workspace_bytes"], dtype=torch.uint8, device=scores.device
        )
        handle = _common.stream(scores.device)
        _C.topk_merge_cuda(args, workspace.data_ptr(), workspace.numel(), handle)


@_topk_merge.register_fake
def _(scores, offset, largest_values, largest_indices, smallest_values, smallest_indices, status):
    # In-place update of the state with no return value: tracing needs no output
    # metadata. The fake lets torch.compile trace through the call and runs the
    # eager checks so a bad call fails at trace time too.
    _check(scores, offset, (largest_values, largest_indices, smallest_values, smallest_indices, status))
    return None


def topk_merge(scores: Tensor, offset: int, largest_values: Tensor, largest_indices: Tensor,
               smallest_values: Tensor, smallest_indices: Tensor, status: Tensor) -> None:
    """Merges a block of scores into running per-query top-k lists, in place.

    The order is total: a better value first (larger for ``largest_*``, smaller for
    ``smallest_*``), on equal values the lower global index first, empty slots
    (index -1) last. The result is exact and does not depend on the order or the
    sizes of the blocks. Non-finite scores are never ranked, only counted in ``status``.

    Args:
        scores: (n_query, b) float32 or float64, any strides; column j has global index offset + j.
        offset: global index of column 0; >= 0 and offset + b < 2**63.
        largest_values, largest_indices: contiguous (n_query, k), k >= 1, values in
            scores' dtype, indices int64; sorted descending.
        smallest_values, smallest_indices: the same, sorted ascending.
        status: contiguous (3,) int64 ``[count of non-finite scores, query row of the
            first, global index of the first]``; the count accumulates across calls,
            the position is set only while the count was 0.

    Raises:
        TypeError, ValueError: naming the argument, the expected and the actual value.
    """
    op = "topk_merge"
    state = (largest_values, largest_indices, smallest_values, smallest_indices, status)
    _common.require_tensors(op, scores=scores)
    _topk_merge(scores, _common.require_state(op, offset, state), *state)


def raise_if_nonfinite(status: Tensor, what: str = "influence scores") -> None:
    """Raises :func:`checks.nonfinite_error` if a kernel counted any NaN/inf (syncs on CUDA).

    Args:
        status: the (3,) int64 ``[count, query row, global index]`` that topk_merge and
            influence_block_update fill.
        what: what the counted values are, for the message.
    """
    count, row, index = (int(v) for v in status.tolist())
    if count:
        raise nonfinite_error(what, count, row, index)
