"""Typed wrappers over the compiled kernels.

Python owns every allocation and every check; `_C` only computes. Each kernel
is registered with ``torch.library.custom_op`` so it can sit inside
``torch.compile``-d code as an opaque call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._native import _C

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CPU_DTYPES = (torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of scores and top-k values for inputs of `dtype` (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cuda_available_in_build() -> bool:
    return hasattr(_C, "influence_block_cuda")


def max_fused_topk(device: torch.device) -> Optional[int]:
    """Largest k the kernel selects on `device` without materialising scores (None: any k)."""
    return _C.build_info()["max_fused_topk"] if device.type == "cuda" else None


def check_block_inputs(S: Tensor, G: Tensor, name: str = "influence_block") -> None:
    """Raises a clear error unless S (n_query, p) and G (b, p) can go to the kernel."""
    for arg, t in (("S", S), ("G", G)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D (rows, p), got shape {tuple(t.shape)}")
        allowed = _CPU_DTYPES if t.device.type == "cpu" else tuple(_DTYPE_CODES)
        if t.dtype not in allowed:
            raise TypeError(
                f"{name}: {arg} must have dtype in {[str(d) for d in allowed]} on {t.device.type}, got {t.dtype}"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: {arg} must be on a CPU or CUDA device, got {t.device}")
    if S.shape[1] != G.shape[1]:
        raise ValueError(
            f"{name}: S and G must have the same number of columns p, got S {tuple(S.shape)} and G {tuple(G.shape)}"
        )
    if S.dtype != G.dtype:
        raise TypeError(f"{name}: S and G must have the same dtype, got {S.dtype} and {G.dtype}")
    if S.device != G.device:
        raise ValueError(f"{name}: S and G must be on the same device, got {S.device} and {G.device}")
    if S.device.type == "cuda" and not cuda_available_in_build():
        raise RuntimeError(
            f"{name}: tensors are on {S.device} but this torchfluence build has no CUDA kernels "
            "(build_info()['cuda'] is False); reinstall with TORCHFLUENCE_CUDA=ON"
        )


def _matrix(t: Optional[Tensor]):
    if t is None:
        return _C.MatrixRef()
    return _C.MatrixRef(t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), t.stride(1))


@torch.library.custom_op(
    "torchfluence::influence_block_update",
    mutates_args=("largest_values", "largest_indices", "smallest_values", "smallest_indices", "status", "scores"),
)
def influence_block_update(
    S: Tensor,
    G: Tensor,
    offset: int,
    largest_values: Tensor,
    largest_indices: Tensor,
    smallest_values: Tensor,
    smallest_indices: Tensor,
    status: Tensor,
    scores: Optional[Tensor],
) -> None:
    """Computes S @ G.T for rows offset..offset+b and merges it into running top-k lists.

    Args:
        S: (n_query, p) query vectors.
        G: (b, p) training vectors; row r has global index offset + r.
        offset: global index of G's first row.
        largest_values, largest_indices: (n_query, k) running top-k of the largest
            scores, sorted descending, ties by lower index; index -1 marks an empty slot.
        smallest_values, smallest_indices: (n_query, k) the same for the smallest scores.
        status: (3,) int64 counter of non-finite scores and the (query, training index)
            of one of them; accumulates across calls.
        scores: optional (n_query, b) output in the accumulation dtype.
    """
    n_query, b = S.shape[0], G.shape[0]
    if n_query == 0 or b == 0:
        return
    k = largest_values.shape[1]
    topk = _C.TopKRef(
        k, largest_values.data_ptr(), largest_indices.data_ptr(), smallest_values.data_ptr(), smallest_indices.data_ptr()
    )
    args = _C.InfluenceBlockArgs(
        _DTYPE_CODES[S.dtype], _matrix(S), _matrix(G), offset, _matrix(scores), topk, status.data_ptr()
    )
    if S.device.type == "cpu":
        _C.influence_block_cpu(args)
        return
    with torch.cuda.device(S.device):
        num_sms = torch.cuda.get_device_properties(S.device).multi_processor_count
        splits = _C.influence_block_cuda_splits(n_query, b, k, num_sms)
        acc_bytes = torch.empty((), dtype=largest_values.dtype).element_size()
        workspace = torch.empty(2 * n_query * splits * k * (acc_bytes + 8), dtype=torch.uint8, device=S.device)
        stream = torch.cuda.current_stream(S.device).cuda_stream
        _C.influence_block_cuda(args, workspace.data_ptr() if k else 0, splits, stream)


@influence_block_update.register_fake
def _(S, G, offset, largest_values, largest_indices, smallest_values, smallest_indices, status, scores):
    # Mutates its arguments in place and returns nothing, so tracing needs no
    # output metadata; the fake exists so torch.compile can trace through it.
    return None


@torch.library.custom_op("torchfluence::influence_scores", mutates_args=())
def influence_scores(S: Tensor, G: Tensor) -> Tensor:
    """Returns the (n_query, b) score block S @ G.T in the accumulation dtype.

    Unlike a matmul it also rejects non-finite results (NaN/inf in S or G) with an
    error naming the offending rows.
    """
    out = torch.empty(S.shape[0], G.shape[0], dtype=accumulation_dtype(S.dtype), device=S.device)
    fill_scores(S, G, 0, out)
    return out


@influence_scores.register_fake
def _(S, G):
    # The output's shape and dtype are all torch.compile needs to plan around the call.
    return S.new_empty(S.shape[0], G.shape[0], dtype=accumulation_dtype(S.dtype))


def fill_scores(S: Tensor, G: Tensor, offset: int, out: Tensor) -> None:
    """Writes S @ G.T into `out` (n_query, b); raises on any NaN/inf score."""
    status = torch.zeros(3, dtype=torch.int64, device=S.device)
    empty = out.new_empty(S.shape[0], 0)
    empty_idx = torch.empty(S.shape[0], 0, dtype=torch.int64, device=S.device)
    influence_block_update(S, G, offset, empty, empty_idx, empty, empty_idx, status, out)
    raise_if_nonfinite(status, S, G, offset)


def raise_if_nonfinite(status: Tensor, S: Optional[Tensor] = None, G: Optional[Tensor] = None,
                       offset: int = 0) -> None:
    """Raises ValueError if the kernel saw any NaN/inf score (syncs on CUDA)."""
    count, query, train = (int(v) for v in status.tolist())
    if count == 0:
        return
    culprit = ""
    if S is not None and G is not None:
        bad = []
        if not bool(torch.isfinite(S[query]).all()):
            bad.append(f"S row {query}")
        if 0 <= train - offset < G.shape[0] and not bool(torch.isfinite(G[train - offset]).all()):
            bad.append(f"G row {train - offset}")
        culprit = f"; non-finite values in {' and '.join(bad)}" if bad else "; the dot product overflowed"
    raise ValueError(
        f"influence_block: {count} influence score(s) are NaN or inf (e.g. query {query}, training index "
        f"{train}){culprit}. Check the model's gradients for NaN/inf before scoring."
    )


def _tensor3(t: Tensor):
    return _C.Tensor3Ref(t.data_ptr(), t.shape[0], t.shape[1], t.shape[2], t.stride(0), t.stride(1), t.stride(2))


@torch.library.custom_op("torchfluence::psg_dot_accumulate", mutates_args=("scores",))
def psg_dot_accumulate(Q: Tensor, A: Tensor, D: Tensor, scores: Tensor) -> None:
    """scores[q, j] += sum_t D[j, t] @ Q[q] @ A[j, t] for one layer, without per-sample gradients in memory.

    Args:
        Q: (n_query, d_out * d_in) query matrices, each row a row-major (d_out, d_in) matrix.
        A: (b, T, d_in) per-sample layer inputs (activations).
        D: (b, T, d_out) per-sample gradients of the loss w.r.t. the layer outputs.
        scores: (n_query, b), accumulated into.
    """
    if Q.shape[0] == 0 or A.shape[0] == 0:
        return
    args = _C.PsgDotArgs(_DTYPE_CODES[Q.dtype], _matrix(Q), _tensor3(A), _tensor3(D), _matrix(scores))
    if Q.device.type == "cpu":
        _C.psg_dot_cpu(args)
        return
    with torch.cuda.device(Q.device):
        _C.psg_dot_cuda(args, torch.cuda.current_stream(Q.device).cuda_stream)


@psg_dot_accumulate.register_fake
def _(Q, A, D, scores):
    # In-place accumulation with no return value: nothing for tracing to infer.
    return None


_HEAD_LOSS_CODES = {"cross_entropy": 0, "mse": 1, "bce_with_logits": 2}


@torch.library.custom_op("torchfluence::linear_head_hvp_accumulate", mutates_args=("out",))
def linear_head_hvp_accumulate(features: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor,
                               loss: str, n_total: int, out: Tensor) -> None:
    """out += (1/n_total) sum_i h_i (V x~_i) x~_i^T over the rows of `features` (closed-form head HVP).

    Args:
        features: (n, d); weight: (C, d); bias: (C,) contiguous or None.
        vectors: (k, C, d1) contiguous, d1 = d + 1 with a bias; out: the same shape, accumulated into.
        loss: "cross_entropy", "mse" or "bce_with_logits"; n_total: the divisor of the mean.
    """
    n, C, k = features.shape[0], weight.shape[0], vectors.shape[0]
    if n == 0 or k == 0:
        return
    workspace = None
    if features.device.type == "cuda":
        workspace = torch.empty(n * C * (k + 1), dtype=features.dtype, device=features.device)
    args = _C.LinearHeadArgs(_DTYPE_CODES[features.dtype], _HEAD_LOSS_CODES[loss], _matrix(features), _matrix(weight),
                             0 if bias is None else bias.data_ptr(), vectors.data_ptr(), out.data_ptr(), k, n_total,
                             0 if workspace is None else workspace.data_ptr())
    if features.device.type == "cpu":
        _C.linear_head_hvp_cpu(args)
        return
    with torch.cuda.device(features.device):
        _C.linear_head_hvp_cuda(args, torch.cuda.current_stream(features.device).cuda_stream)


@linear_head_hvp_accumulate.register_fake
def _(features, weight, bias, vectors, loss, n_total, out):
    # Accumulates into `out` in place; nothing to describe for tracing.
    return None
