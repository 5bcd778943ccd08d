"""influence_block_update: S @ G.T fused with the merge into the running top-k (csrc/*/influence_block.*)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._native import _C
from . import _common

_fused_topk_limits: dict[tuple[int, int], int] = {}


def max_fused_topk(device: torch.device, dtype: torch.dtype = torch.float32) -> Optional[int]:
    """Largest k the fused kernel selects on `device` for `dtype` inputs (None: any k; 0: none).

    The kernel keeps 2 x 64 x k (value, index) pairs per CTA in shared memory, so
    the limit depends on the accumulator width (float64 for float64 inputs) and
    on the device's opt-in shared memory per block (99 KiB on sm_86/sm_89,
    227 KiB on sm_90); it never exceeds ``build_info()["max_fused_topk"]``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    acc_bytes = 8 if dtype == torch.float64 else 4
    key = (index, acc_bytes)
    if key not in _fused_topk_limits:
        props = torch.cuda.get_device_properties(index)
        optin = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
        k = _C.build_info()["max_fused_topk"]
        while k > 0 and _C.influence_block_shared_bytes(k, acc_bytes) > optin:
            k -= 1
        _fused_topk_limits[key] = k
    return _fused_topk_limits[key]


def check_block_inputs(S: Tensor, G: Tensor, name: str = "influence_block") -> None:
    """Raises a clear error unless S (n_query, p) and G (b, p) can go to the kernel.

    Args:
        S: (n_query, p) query vectors; G: (b, p) training vectors.
        name: the function named in the message.

    Raises:
        TypeError, ValueError: naming the argument, the expected and the actual value.
        RuntimeError: for CUDA tensors when this build has no CUDA kernels.
    """
    for arg, t in (("S", S), ("G", G)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{name}: {arg} must be a strided (dense) tensor, got {t.layout}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D (rows, p), got shape {tuple(t.shape)}")
        _common.check_dtype_in(name, arg, t)
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: {arg} must be on a CPU or CUDA device, got {t.device}")
    if S.shape[1] != G.shape[1]:
        raise ValueError(
            f"{name}: S and G must have the same number of columns p, got S {tuple(S.shape)} and "
            f"G {tuple(G.shape)}"
        )
    if S.dtype != G.dtype:
        raise TypeError(f"{name}: S and G must have the same dtype, got {S.dtype} and {G.dtype}")
    if S.device != G.device:
        raise ValueError(f"{name}: S and G must be on the same device, got {S.device} and {G.device}")
    _common.check_backend(name, S.device)


def _check(S, G, offset, state: tuple, scores) -> tuple[int, int, int]:
    op = "influence_block_update"
    check_block_inputs(S, G, op)
    n_query, b = S.shape[0], G.shape[0]
    acc, device = _common.accumulation_dtype(S.dtype), S.device
    k = _common.state_k(op, state[0], n_query, acc, device)
    if device.type == "cuda":
        limit = max_fused_topk(device, S.dtype)
        if k > limit:
            raise ValueError(
                f"{op}: k = {k} is above the fused CUDA top-k limit for {S.dtype} on this device, "
                f"max_fused_topk = {limit}; "
                "compute S @ G.T and merge it with topk_merge instead"
            )
        limits = _common.cuda_limits()
        for what, size, bound in (
            ("query rows (S)", n_query, limits["influence_block_max_query_rows"]),
            ("training rows (G)", b, limits["influence_block_max_train_rows"]),
        ):
            if size > bound:
                raise ValueError(f"{op}: at most {bound} {what} per CUDA call, got {size}; split the block")
    _common.check_state(op, n_query, k, acc, device, state)
    if scores is not None:
        _common.check_output(op, "scores", scores, (n_query, b), acc, device)
    _common.check_offset(op, offset, b)
    return n_query, b, k


@torch.library.custom_op(
    "torchfluence::influence_block_update", mutates_args=(*_common.STATE_NAMES, "scores")
)
def _influence_block_update(
    S: Tensor, G: Tensor, offset: int, largest_values: Tensor, largest_indices: Tensor,
    smallest_values: Tensor, smallest_indices: Tensor, status: Tensor, scores: Optional[Tensor],
) -> None:
    state = (largest_values, largest_indices, smallest_values, smallest_indices, status)
    n_query, b, k = _check(S, G, offset, state, scores)
    if n_query == 0 or b == 0:
        return
    args = _C.InfluenceBlockArgs(
        _common.DTYPE_CODES[S.dtype],
        _common.matrix_ref(S),
        _common.matrix_ref(G),
        offset,
        _common.matrix_ref(scores),
        _common.topk_ref(state),
        _common.vector_ref(status),
    )
    if S.device.type == "cpu":
        _C.influence_block_cpu(args)
        return
    with torch.cuda.device(S.device):
        num_sms = torch.cuda.get_device_properties(S.device).multi_processor_count
        splits = _C.influence_block_cuda_splits(n_query, b, k, num_sms)
        acc_bytes = largest_values.element_size()
        workspace = torch.empty(
            2 * n_query * splits * k * (acc_bytes + 8), dtype=torch.uint8, device=S.device
        )
        handle = _common.stream(S.device)
        _C.influence_block_cuda(args, workspace.data_ptr(), workspace.numel(), splits, handle)


@_influence_block_update.register_fake
def _(S, G, offset, largest_values, largest_indices, smallest_values, smallest_indices, status, scores):
    # Mutates its arguments in place and returns nothing, so tracing needs no
    # output metadata; the fake exists so torch.compile can trace through the
    # call, and it runs the eager checks so a bad call fails at trace time too.
    _check(S, G, offset, (largest_values, largest_indices, smallest_values, smallest_indices, status), scores)
    return None


def influence_block_update(S: Tensor, G: Tensor, offset: int, largest_values: Tensor, largest_indices: Tensor,
                           smallest_values: Tensor, smallest_indices: Tensor, status: Tensor,
                           scores: Optional[Tensor] = None) -> None:
    """Computes S @ G.T for rows offset..offset+b and merges it into running top-k lists.

    The top-k state is required (k >= 1); for the scores alone compute ``S @ G.T``
    (the caller's matmul). On CUDA, k must be at most :func:`max_fused_topk`;
    larger k is refused (compute the scores and use :func:`topk_merge`).

    Args:
        S: (n_query, p) query vectors; float32/float64 (CPU), also float16/bfloat16 (CUDA); any strides.
        G: (b, p) training vectors, S's dtype and device; row r has global index offset + r.
        offset: global index of G's first row; >= 0 and offset + b < 2**63.
        largest_values, largest_indices: contiguous (n_query, k) running top-k of the largest
            scores (accumulation dtype / int64), sorted descending, ties by lower index;
            index -1 marks an empty slot.
        smallest_values, smallest_indices: the same for the smallest scores, ascending.
        status: contiguous (3,) int64: count of non-finite scores seen, and the query row
            and global index of the first; accumulates across calls.
        scores: optional (n_query, b) output in the accumulation dtype (any non-overlapping strides).

    Raises:
        TypeError, ValueError: naming the argument, the expected and the actual value.
    """
    op = "influence_block_update"
    state = (largest_values, largest_indices, smallest_values, smallest_indices, status)
    _common.require_tensors(op, S=S, G=G)
    offset = _common.require_state(op, offset, state)
    if scores is not None:
        _common.require_tensors(op, scores=scores)
    _influence_block_update(S, G, offset, *state, scores)
