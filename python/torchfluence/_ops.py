"""Typed wrappers over the compiled kernels: the one place tensors are checked.

Python owns every allocation and every check. Before a pointer reaches `_C`,
each op verifies that every argument is a tensor of the expected dtype, exact
shape and device, that the arrays a kernel writes with implied strides are
contiguous, and that the sizes fit the kernels (int64 offsets, CUDA grid
bounds: a call too large for one launch is split, or refused with the limit
named). `_C` repeats every check whose failure would write out of bounds.

Each kernel is a ``torch.library.custom_op`` so it can sit inside
``torch.compile``-d code as an opaque call. The public functions of the same
names check argument *types* first, because the dispatcher would refuse a
non-tensor or an out-of-range int with a RuntimeError that names neither the
op's argument nor what was expected; the op itself checks everything else.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from ._native import _C
from .checks import nonfinite_error

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CPU_DTYPES = (torch.float32, torch.float64)
# Element types `_C` can be told about (matches DType in csrc/common.h).
_ELEMENT_CODES = {**_DTYPE_CODES, torch.int64: 4}
_SCORE_DTYPES = (torch.float32, torch.float64)
_INT64_MAX = 2**63 - 1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of scores and top-k values for inputs of `dtype` (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cuda_available_in_build() -> bool:
    return hasattr(_C, "influence_block_cuda")


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


_cuda_limits_cache: Optional[dict] = None


def _cuda_limits() -> dict:
    """Launch bounds of the CUDA kernels, as compiled (see csrc/cuda/*_cuda.h)."""
    global _cuda_limits_cache
    if _cuda_limits_cache is None:
        _cuda_limits_cache = dict(_C.cuda_limits())
    return _cuda_limits_cache


# ---------------------------------------------------------------------------
# Argument checks. Every message names the op, the argument, what was expected
# and what was given.


def _shape_str(shape) -> str:
    dims = tuple(int(s) for s in shape)
    return f"({dims[0]},)" if len(dims) == 1 else str(dims)


def _got(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    if t.layout != torch.strided:
        return f"a {t.layout} tensor"
    layout = "" if t.is_contiguous() else "non-contiguous "
    return f"{layout}{_shape_str(t.shape)} {t.dtype} on {t.device}"


def _expect(
    op: str, name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device, contiguous: bool = True
) -> None:
    """`t` must be a tensor of exactly this shape, dtype and device (and contiguous)."""
    if (
        isinstance(t, Tensor)
        and t.layout == torch.strided
        and t.dtype == dtype
        and tuple(t.shape) == shape
        and t.device == device
        and (not contiguous or t.is_contiguous())
    ):
        return
    what = f"a {'contiguous ' if contiguous else ''}{_shape_str(shape)} {dtype} tensor on {device}"
    wrong_type = not isinstance(t, Tensor) or t.dtype != dtype
    raise (TypeError if wrong_type else ValueError)(f"{op}: {name} must be {what}, got {_got(t)}")


def _check_input(op: str, name: str, t, ndim: int, doc: str, dtypes: Optional[tuple] = None) -> None:
    """A tensor the kernel only reads (any strides): type, rank, device kind and dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a {doc} torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a strided (dense) tensor, got {t.layout}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {doc}, got shape {_shape_str(t.shape)}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} must be on a CPU or CUDA device, got {t.device}")
    allowed = (
        dtypes if dtypes is not None else (_CPU_DTYPES if t.device.type == "cpu" else tuple(_DTYPE_CODES))
    )
    if t.dtype not in allowed:
        raise TypeError(
            f"{op}: {name} must have dtype in {[str(d) for d in allowed]} on {t.device.type}, got {t.dtype}"
        )


def _check_same(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """An input must share its dtype and device with the op's first input."""
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on {ref.device} like {ref_name}, got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have dtype {ref.dtype} like {ref_name}, got {t.dtype}")


def _check_backend(op: str, device: torch.device) -> None:
    if device.type == "cuda" and not cuda_available_in_build():
        raise RuntimeError(
            f"{op}: tensors are on {device} but this torchfluence build has no CUDA kernels "
            "(build_info()['cuda'] is False); reinstall with TORCHFLUENCE_CUDA=ON"
        )


def _check_non_overlapping(op: str, name: str, t: Tensor) -> None:
    """An output written element by element through its strides must not alias itself."""
    (rows, cols), (sr, sc) = t.shape, t.stride()
    if rows == 0 or cols == 0:
        return
    if rows == 1 or cols == 1:
        ok = (rows <= 1 or sr > 0) and (cols <= 1 or sc > 0)
    else:
        inner, inner_n, outer = (sc, cols, sr) if sc <= sr else (sr, rows, sc)
        ok = inner > 0 and outer >= inner * inner_n
    if not ok:
        raise ValueError(
            f"{op}: {name} must not have overlapping elements, got shape {_shape_str(t.shape)} with "
            f"strides {tuple(t.stride())}"
        )


def _as_int(op: str, name: str, value) -> int:
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}") from None


def _check_offset(op: str, offset, count: int) -> None:
    """offset >= 0 and offset + count fits in int64 (the kernels' global indices)."""
    offset = _as_int(op, "offset", offset)
    if isinstance(offset, torch.SymInt):
        return  # traced: checked when the op runs
    if offset < 0:
        raise ValueError(f"{op}: offset must be >= 0, got {offset}")
    if offset > _INT64_MAX:
        raise ValueError(f"{op}: offset must fit in int64 (<= 2**63 - 1), got {offset}")
    if offset > _INT64_MAX - count:
        raise ValueError(
            f"{op}: offset + b must fit in int64 (global indices), got offset {offset} with b = {count}"
        )


def _state_k(op: str, largest_values, n_query: int, dtype: torch.dtype, device: torch.device) -> int:
    """k, read from largest_values (which `_check_state` then checks in full)."""
    if not isinstance(largest_values, Tensor) or largest_values.dim() != 2:
        raise (TypeError if not isinstance(largest_values, Tensor) else ValueError)(
            f"{op}: largest_values must be a contiguous (n_query, k) = ({n_query}, k) {dtype} tensor on "
            f"{device}, got {_got(largest_values)}"
        )
    k = int(largest_values.shape[1])
    if k < 1:
        raise ValueError(
            f"{op}: the top-k state must have k >= 1 columns, got largest_values "
            f"{_shape_str(largest_values.shape)} (for scores alone compute S @ G.T)"
        )
    return k


def _check_state(
    op: str,
    n_query: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    largest_values,
    largest_indices,
    smallest_values,
    smallest_indices,
    status,
) -> None:
    shape = (n_query, k)
    _expect(op, "largest_values", largest_values, shape, dtype, device)
    _expect(op, "largest_indices", largest_indices, shape, torch.int64, device)
    _expect(op, "smallest_values", smallest_values, shape, dtype, device)
    _expect(op, "smallest_indices", smallest_indices, shape, torch.int64, device)
    _expect(op, "status", status, (3,), torch.int64, device)


def check_block_inputs(S: Tensor, G: Tensor, name: str = "influence_block") -> None:
    """Raises a clear error unless S (n_query, p) and G (b, p) can go to the kernel."""
    for arg, t in (("S", S), ("G", G)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{name}: {arg} must be a strided (dense) tensor, got {t.layout}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D (rows, p), got shape {tuple(t.shape)}")
        allowed = _CPU_DTYPES if t.device.type == "cpu" else tuple(_DTYPE_CODES)
        if t.dtype not in allowed:
            raise TypeError(
                f"{name}: {arg} must have dtype in {[str(d) for d in allowed]} on {t.device.type}, "
                f"got {t.dtype}"
            )
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
    _check_backend(name, S.device)


def _require_tensors(op: str, **tensors) -> None:
    """Type check ahead of the dispatcher (which would raise an unhelpful RuntimeError)."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


# ---------------------------------------------------------------------------
# Views of tensors for `_C` (data pointer, sizes, strides in elements, element type).


def _matrix(t: Optional[Tensor]):
    if t is None:
        return _C.MatrixRef()
    return _C.MatrixRef(
        t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), t.stride(1), _ELEMENT_CODES[t.dtype]
    )


def _vector(t: Optional[Tensor]):
    if t is None:
        return _C.VectorRef()
    return _C.VectorRef(t.data_ptr(), t.shape[0], t.stride(0), _ELEMENT_CODES[t.dtype])


def _tensor3(t: Tensor):
    return _C.Tensor3Ref(
        t.data_ptr(),
        t.shape[0],
        t.shape[1],
        t.shape[2],
        t.stride(0),
        t.stride(1),
        t.stride(2),
        _ELEMENT_CODES[t.dtype],
    )


def _topk_ref(
    largest_values: Tensor, largest_indices: Tensor, smallest_values: Tensor, smallest_indices: Tensor
):
    return _C.TopKRef(
        _matrix(largest_values), _matrix(largest_indices), _matrix(smallest_values), _matrix(smallest_indices)
    )


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ---------------------------------------------------------------------------
# influence_block_update: S @ G.T fused with the top-k merge.


def _check_influence_block_update(
    S, G, offset, largest_values, largest_indices, smallest_values, smallest_indices, status, scores
) -> tuple[int, int, int]:
    op = "influence_block_update"
    check_block_inputs(S, G, op)
    n_query, b = S.shape[0], G.shape[0]
    acc, device = accumulation_dtype(S.dtype), S.device
    k = _state_k(op, largest_values, n_query, acc, device)
    if device.type == "cuda":
        limit = max_fused_topk(device, S.dtype)
        if k > limit:
            raise ValueError(
                f"{op}: k = {k} is above the fused CUDA top-k limit for {S.dtype} on this device, "
                f"max_fused_topk = {limit}; "
                "compute S @ G.T and merge it with topk_merge instead"
            )
        limits = _cuda_limits()
        for what, size, bound in (
            ("query rows (S)", n_query, limits["influence_block_max_query_rows"]),
            ("training rows (G)", b, limits["influence_block_max_train_rows"]),
        ):
            if size > bound:
                raise ValueError(f"{op}: at most {bound} {what} per CUDA call, got {size}; split the block")
    _check_state(
        op,
        n_query,
        k,
        acc,
        device,
        largest_values,
        largest_indices,
        smallest_values,
        smallest_indices,
        status,
    )
    if scores is not None:
        _expect(op, "scores", scores, (n_query, b), acc, device, contiguous=False)
        _check_non_overlapping(op, "scores", scores)
    _check_offset(op, offset, b)
    return n_query, b, k


@torch.library.custom_op(
    "torchfluence::influence_block_update",
    mutates_args=(
        "largest_values",
        "largest_indices",
        "smallest_values",
        "smallest_indices",
        "status",
        "scores",
    ),
)
def _influence_block_update(
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
    n_query, b, k = _check_influence_block_update(
        S, G, offset, largest_values, largest_indices, smallest_values, smallest_indices, status, scores
    )
    if n_query == 0 or b == 0:
        return
    args = _C.InfluenceBlockArgs(
        _DTYPE_CODES[S.dtype],
        _matrix(S),
        _matrix(G),
        offset,
        _matrix(scores),
        _topk_ref(largest_values, largest_indices, smallest_values, smallest_indices),
        _vector(status),
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
        _C.influence_block_cuda(args, workspace.data_ptr(), workspace.numel(), splits, _stream(S.device))


@_influence_block_update.register_fake
def _(S, G, offset, largest_values, largest_indices, smallest_values, smallest_indices, status, scores):
    # Mutates its arguments in place and returns nothing, so tracing needs no
    # output metadata; the fake exists so torch.compile can trace through the
    # call, and it runs the eager checks so a bad call fails at trace time too.
    _check_influence_block_update(
        S, G, offset, largest_values, largest_indices, smallest_values, smallest_indices, status, scores
    )
    return None


def influence_block_update(
    S: Tensor,
    G: Tensor,
    offset: int,
    largest_values: Tensor,
    largest_indices: Tensor,
    smallest_values: Tensor,
    smallest_indices: Tensor,
    status: Tensor,
    scores: Optional[Tensor] = None,
) -> None:
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
    _require_tensors(
        op,
        S=S,
        G=G,
        largest_values=largest_values,
        largest_indices=largest_indices,
        smallest_values=smallest_values,
        smallest_indices=smallest_indices,
        status=status,
    )
    if scores is not None:
        _require_tensors(op, scores=scores)
    _check_offset(op, offset, 0)  # in int64 range for the dispatcher; the op checks offset + b
    _influence_block_update(
        S,
        G,
        _as_int(op, "offset", offset),
        largest_values,
        largest_indices,
        smallest_values,
        smallest_indices,
        status,
        scores,
    )


# ---------------------------------------------------------------------------
# topk_merge: precomputed scores merged into the running top-k.


def _check_topk_merge(
    scores, offset, largest_values, largest_indices, smallest_values, smallest_indices, status
) -> tuple[int, int]:
    op = "topk_merge"
    _check_input(op, "scores", scores, 2, "(n_query, b)", _SCORE_DTYPES)
    _check_backend(op, scores.device)
    n_query, b = scores.shape
    k = _state_k(op, largest_values, n_query, scores.dtype, scores.device)
    _check_state(
        op,
        n_query,
        k,
        scores.dtype,
        scores.device,
        largest_values,
        largest_indices,
        smallest_values,
        smallest_indices,
        status,
    )
    _check_offset(op, offset, b)
    return n_query, b


@torch.library.custom_op(
    "torchfluence::topk_merge",
    mutates_args=("largest_values", "largest_indices", "smallest_values", "smallest_indices", "status"),
)
def _topk_merge(
    scores: Tensor,
    offset: int,
    largest_values: Tensor,
    largest_indices: Tensor,
    smallest_values: Tensor,
    smallest_indices: Tensor,
    status: Tensor,
) -> None:
    n_query, b = _check_topk_merge(
        scores, offset, largest_values, largest_indices, smallest_values, smallest_indices, status
    )
    if n_query == 0 or b == 0:
        return
    args = _C.TopKMergeArgs(
        _matrix(scores),
        offset,
        _topk_ref(largest_values, largest_indices, smallest_values, smallest_indices),
        _vector(status),
    )
    if scores.device.type == "cpu":
        _C.topk_merge_cpu(args)
        return
    with torch.cuda.device(scores.device):
        workspace = torch.empty(
            _cuda_limits()["topk_merge_workspace_bytes"], dtype=torch.uint8, device=scores.device
        )
        _C.topk_merge_cuda(args, workspace.data_ptr(), workspace.numel(), _stream(scores.device))


@_topk_merge.register_fake
def _(scores, offset, largest_values, largest_indices, smallest_values, smallest_indices, status):
    # In-place update of the state with no return value: tracing needs no output
    # metadata. The fake lets torch.compile trace through the call and runs the
    # eager checks so a bad call fails at trace time too.
    _check_topk_merge(
        scores, offset, largest_values, largest_indices, smallest_values, smallest_indices, status
    )
    return None


def topk_merge(
    scores: Tensor,
    offset: int,
    largest_values: Tensor,
    largest_indices: Tensor,
    smallest_values: Tensor,
    smallest_indices: Tensor,
    status: Tensor,
) -> None:
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
    _require_tensors(
        op,
        scores=scores,
        largest_values=largest_values,
        largest_indices=largest_indices,
        smallest_values=smallest_values,
        smallest_indices=smallest_indices,
        status=status,
    )
    _check_offset(op, offset, 0)  # in int64 range for the dispatcher; the op checks offset + b
    _topk_merge(
        scores,
        _as_int(op, "offset", offset),
        largest_values,
        largest_indices,
        smallest_values,
        smallest_indices,
        status,
    )


def raise_if_nonfinite(status: Tensor, what: str = "influence scores") -> None:
    """Raises :func:`checks.nonfinite_error` if a kernel counted any NaN/inf (syncs on CUDA).

    Args:
        status: the (3,) int64 ``[count, query row, global index]`` the top-k ops fill.
        what: what the counted values are, for the message.
    """
    count, row, index = (int(v) for v in status.tolist())
    if count:
        raise nonfinite_error(what, count, row, index)


# ---------------------------------------------------------------------------
# psg_dot_accumulate: scores of one captured layer without per-sample gradients.


def _check_psg_dot(Q, A, D, scores) -> None:
    op = "psg_dot_accumulate"
    _check_input(op, "Q", Q, 2, "(n_query, d_out * d_in)")
    _check_input(op, "A", A, 3, "(b, T, d_in)")
    _check_input(op, "D", D, 3, "(b, T, d_out)")
    _check_same(op, "A", A, "Q", Q)
    _check_same(op, "D", D, "Q", Q)
    _check_backend(op, Q.device)
    if A.shape[:2] != D.shape[:2]:
        raise ValueError(
            f"{op}: A (b, T, d_in) and D (b, T, d_out) must agree in b and T, got "
            f"{_shape_str(A.shape)} and {_shape_str(D.shape)}"
        )
    d_in, d_out = A.shape[2], D.shape[2]
    if Q.shape[1] != d_out * d_in:
        raise ValueError(
            f"{op}: Q must have d_out * d_in = {d_out} * {d_in} = {d_out * d_in} columns, got "
            f"{_shape_str(Q.shape)}"
        )
    _expect(
        op,
        "scores",
        scores,
        (Q.shape[0], A.shape[0]),
        accumulation_dtype(Q.dtype),
        Q.device,
        contiguous=False,
    )
    _check_non_overlapping(op, "scores", scores)


@torch.library.custom_op("torchfluence::psg_dot_accumulate", mutates_args=("scores",))
def _psg_dot_accumulate(Q: Tensor, A: Tensor, D: Tensor, scores: Tensor) -> None:
    _check_psg_dot(Q, A, D, scores)
    n_query, b = Q.shape[0], A.shape[0]
    if n_query == 0 or b == 0:
        return
    if Q.device.type == "cpu":
        _C.psg_dot_cpu(
            _C.PsgDotArgs(_DTYPE_CODES[Q.dtype], _matrix(Q), _tensor3(A), _tensor3(D), _matrix(scores))
        )
        return
    limits = _cuda_limits()
    q_step, j_step = limits["psg_dot_max_query_rows"], limits["psg_dot_max_samples"]
    with torch.cuda.device(Q.device):
        stream = _stream(Q.device)
        # One launch covers a bounded grid: larger calls go in (query, sample) pieces.
        for q0 in range(0, n_query, q_step):
            for j0 in range(0, b, j_step):
                q, a, d = Q[q0 : q0 + q_step], A[j0 : j0 + j_step], D[j0 : j0 + j_step]
                out = scores[q0 : q0 + q_step, j0 : j0 + j_step]
                _C.psg_dot_cuda(
                    _C.PsgDotArgs(_DTYPE_CODES[Q.dtype], _matrix(q), _tensor3(a), _tensor3(d), _matrix(out)),
                    stream,
                )


@_psg_dot_accumulate.register_fake
def _(Q, A, D, scores):
    # In-place accumulation with no return value: nothing for tracing to infer.
    # The fake lets torch.compile trace through and runs the eager checks.
    _check_psg_dot(Q, A, D, scores)
    return None


def psg_dot_accumulate(Q: Tensor, A: Tensor, D: Tensor, scores: Tensor) -> None:
    """scores[q, j] += sum_t D[j, t] @ Q[q] @ A[j, t] for one layer, without per-sample gradients in memory.

    Args:
        Q: (n_query, d_out * d_in) query matrices, each row a row-major (d_out, d_in) matrix;
            float32/float64 (CPU), also float16/bfloat16 (CUDA); any strides.
        A: (b, T, d_in) per-sample layer inputs (activations), Q's dtype and device, any strides.
        D: (b, T, d_out) per-sample gradients of the loss w.r.t. the layer outputs, likewise.
        scores: (n_query, b) in the accumulation dtype (any non-overlapping strides), accumulated into.

    Raises:
        TypeError, ValueError: naming the argument, the expected and the actual value.
    """
    _require_tensors("psg_dot_accumulate", Q=Q, A=A, D=D, scores=scores)
    _psg_dot_accumulate(Q, A, D, scores)


# ---------------------------------------------------------------------------
# linear_head_hvp_accumulate: closed-form Hessian-vector products of a linear head.

_HEAD_LOSS_CODES = {"cross_entropy": 0, "mse": 1, "bce_with_logits": 2}


def _check_linear_head(features, weight, bias, vectors, loss, n_total, out) -> tuple[int, int, int]:
    op = "linear_head_hvp_accumulate"
    _check_input(op, "features", features, 2, "(n, d)", _CPU_DTYPES)
    _check_input(op, "weight", weight, 2, "(C, d)", _CPU_DTYPES)
    _check_same(op, "weight", weight, "features", features)
    _check_backend(op, features.device)
    dtype, device = features.dtype, features.device
    (n, d), C = features.shape, weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(
            f"{op}: weight must have d = {d} columns like features {_shape_str(features.shape)}, got "
            f"{_shape_str(weight.shape)}"
        )
    if bias is not None:
        _expect(op, "bias", bias, (C,), dtype, device)
    if not isinstance(loss, str) or loss not in _HEAD_LOSS_CODES:
        raise ValueError(f"{op}: loss must be one of {list(_HEAD_LOSS_CODES)}, got {loss!r}")
    n_total = _as_int(op, "n_total", n_total)
    if not isinstance(n_total, torch.SymInt) and n_total < 1:
        raise ValueError(f"{op}: n_total must be >= 1, got {n_total}")
    d1 = d + (bias is not None)
    if not isinstance(vectors, Tensor) or vectors.dim() != 3:
        raise (TypeError if not isinstance(vectors, Tensor) else ValueError)(
            f"{op}: vectors must be a contiguous (k, C, d1) = (k, {C}, {d1}) {dtype} tensor on {device}, "
            f"got {_got(vectors)}"
        )
    k = vectors.shape[0]
    _expect(op, "vectors", vectors, (k, C, d1), dtype, device)
    _expect(op, "out", out, (k, C, d1), dtype, device)
    if device.type == "cuda" and C > _cuda_limits()["linear_head_max_vector_classes"]:
        raise ValueError(
            f"{op}: at most {_cuda_limits()['linear_head_max_vector_classes']} classes per CUDA call, "
            f"got weight {_shape_str(weight.shape)}"
        )
    return n, C, k


@torch.library.custom_op("torchfluence::linear_head_hvp_accumulate", mutates_args=("out",))
def _linear_head_hvp_accumulate(
    features: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    vectors: Tensor,
    loss: str,
    n_total: int,
    out: Tensor,
) -> None:
    n, C, k = _check_linear_head(features, weight, bias, vectors, loss, n_total, out)
    if n == 0 or k == 0 or C == 0:
        return
    code, loss_code = _DTYPE_CODES[features.dtype], _HEAD_LOSS_CODES[loss]
    if features.device.type == "cpu":
        _C.linear_head_hvp_cpu(
            _C.LinearHeadArgs(
                code,
                loss_code,
                _matrix(features),
                _matrix(weight),
                _vector(bias),
                _tensor3(vectors),
                _tensor3(out),
                n_total,
                0,
                0,
            )
        )
        return
    limits = _cuda_limits()
    # One launch has a CTA row per (vector, class) and a thread per (vector, sample):
    # larger calls go in pieces of vectors (each piece is contiguous along dim 0).
    step = max(
        1, min(limits["linear_head_max_vector_classes"] // C, limits["linear_head_max_vector_samples"] // n)
    )
    if limits["linear_head_max_vector_samples"] // n < 1:
        raise ValueError(
            f"linear_head_hvp_accumulate: at most {limits['linear_head_max_vector_samples']} samples per "
            f"CUDA call, got features {_shape_str(features.shape)}"
        )
    with torch.cuda.device(features.device):
        stream = _stream(features.device)
        for v0 in range(0, k, step):
            v, o = vectors[v0 : v0 + step], out[v0 : v0 + step]
            workspace = torch.empty(n * C * (v.shape[0] + 1), dtype=features.dtype, device=features.device)
            args = _C.LinearHeadArgs(
                code,
                loss_code,
                _matrix(features),
                _matrix(weight),
                _vector(bias),
                _tensor3(v),
                _tensor3(o),
                n_total,
                workspace.data_ptr(),
                workspace.numel() * workspace.element_size(),
            )
            _C.linear_head_hvp_cuda(args, stream)


@_linear_head_hvp_accumulate.register_fake
def _(features, weight, bias, vectors, loss, n_total, out):
    # Accumulates into `out` in place; nothing to describe for tracing. The fake
    # lets torch.compile trace through and runs the eager checks.
    _check_linear_head(features, weight, bias, vectors, loss, n_total, out)
    return None


def linear_head_hvp_accumulate(
    features: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    vectors: Tensor,
    loss: str,
    n_total: int,
    out: Tensor,
) -> None:
    """out += (1/n_total) sum_i h_i (V x~_i) x~_i^T over the rows of `features` (closed-form head HVP).

    Args:
        features: (n, d) float32 or float64, any strides; weight: (C, d), same dtype and device, any strides.
        bias: contiguous (C,) or None.
        vectors: contiguous (k, C, d1), d1 = d + 1 with a bias; out: the same shape, accumulated into.
        loss: "cross_entropy", "mse" or "bce_with_logits"; n_total: the divisor of the mean (>= 1).

    Raises:
        TypeError, ValueError: naming the argument, the expected and the actual value.
    """
    op = "linear_head_hvp_accumulate"
    _require_tensors(op, features=features, weight=weight, vectors=vectors, out=out)
    if bias is not None:
        _require_tensors(op, bias=bias)
    if not isinstance(loss, str):
        raise TypeError(
            f"{op}: loss must be a str, one of {list(_HEAD_LOSS_CODES)}, got {type(loss).__name__}"
        )
    n_total = _as_int(op, "n_total", n_total)
    if not isinstance(n_total, torch.SymInt) and not 1 <= n_total <= _INT64_MAX:
        raise ValueError(f"{op}: n_total must be >= 1 and fit in int64, got {n_total}")
    _linear_head_hvp_accumulate(features, weight, bias, vectors, loss, n_total, out)


# ---------------------------------------------------------------------------
# sjlt_accumulate: the sparse Johnson-Lindenstrauss projection of a block of columns.

# Limits of the kernels (csrc/sjlt.h): s bounds the CUDA kernel's shared codes, k the int32 bucket codes.
SJLT_MAX_S = 64
SJLT_MAX_K = 2**30


def _check_sjlt(G, offset, s, seed, out) -> None:
    op = "sjlt_accumulate"
    _check_input(op, "G", G, 2, "(n, p_block)")
    _check_backend(op, G.device)
    n, acc = G.shape[0], accumulation_dtype(G.dtype)
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise (TypeError if not isinstance(out, Tensor) else ValueError)(
            f"{op}: out must be a (n, k) = ({n}, k) {acc} tensor on {G.device}, got {_got(out)}"
        )
    k = out.shape[1]
    if not 1 <= k <= SJLT_MAX_K:
        raise ValueError(f"{op}: out must have 1 <= k <= {SJLT_MAX_K} columns, got {_shape_str(out.shape)}")
    _expect(op, "out", out, (n, k), acc, G.device, contiguous=False)
    _check_non_overlapping(op, "out", out)
    s = _as_int(op, "s", s)
    if not isinstance(s, torch.SymInt) and not 1 <= s <= min(k, SJLT_MAX_S):
        raise ValueError(f"{op}: s must be in [1, min(k, {SJLT_MAX_S})] = [1, {min(k, SJLT_MAX_S)}], got {s}")
    seed = _as_int(op, "seed", seed)
    if not isinstance(seed, torch.SymInt) and not 0 <= seed <= _INT64_MAX:
        raise ValueError(f"{op}: seed must be in [0, 2**63 - 1], got {seed}")
    offset = _as_int(op, "offset", offset)
    if not isinstance(offset, torch.SymInt) and offset > _INT64_MAX - G.shape[1]:
        raise ValueError(
            f"{op}: offset + p_block must fit in int64 (global column indices), got offset {offset} with "
            f"p_block = {G.shape[1]}"
        )
    _check_offset(op, offset, G.shape[1])


@torch.library.custom_op("torchfluence::sjlt_accumulate", mutates_args=("out",))
def _sjlt_accumulate(G: Tensor, offset: int, s: int, seed: int, out: Tensor) -> None:
    _check_sjlt(G, offset, s, seed, out)
    if G.shape[0] == 0 or G.shape[1] == 0:
        return
    args = _C.SjltArgs(_DTYPE_CODES[G.dtype], _matrix(G), offset, s, seed, _matrix(out))
    if G.device.type == "cpu":
        _C.sjlt_cpu(args)
        return
    with torch.cuda.device(G.device):
        _C.sjlt_cuda(args, _stream(G.device))


@_sjlt_accumulate.register_fake
def _(G, offset, s, seed, out):
    # Accumulates into `out` in place; nothing to describe for tracing. The fake
    # lets torch.compile trace through and runs the eager checks.
    _check_sjlt(G, offset, s, seed, out)
    return None


def sjlt_accumulate(G: Tensor, out: Tensor, s: int, seed: int, offset: int = 0) -> None:
    """out += G @ P[:, offset : offset + p_block].T for the sparse JL matrix P (k, p) of (seed, s, k).

    P has s non-zeros +-1/sqrt(s) per column, one in each of s row blocks, from a
    counter-based hash of (seed, global column, block); it is never stored (see
    csrc/sjlt.h and :func:`torchfluence.reference.sjlt_codes_reference`). Every
    output is accumulated in ascending column order from its value in `out`, so the
    CPU and CUDA kernels give the same bits, two calls on consecutive column blocks
    give the same bits as one call on both, and no result depends on thread counts.

    Args:
        G: (n, p_block) rows to project, global columns offset .. offset + p_block - 1;
            float32/float64 (CPU), also float16/bfloat16 (CUDA); any strides.
        out: (n, k) accumulated into, in the accumulation dtype of G (float64 for float64,
            float32 otherwise), G's device, any non-overlapping strides; 1 <= k <= 2**30.
        s: non-zeros per column, 1 <= s <= min(k, 64).
        seed: in [0, 2**63 - 1].
        offset: global index of G's column 0; >= 0 and offset + p_block < 2**63.

    Raises:
        TypeError, ValueError: naming the argument, the expected and the actual value.
    """
    op = "sjlt_accumulate"
    _require_tensors(op, G=G, out=out)
    for name, value in (("s", s), ("seed", seed), ("offset", offset)):
        # In int64 range for the dispatcher; the op checks the meaningful range and names it.
        value = _as_int(op, name, value)
        if not isinstance(value, torch.SymInt) and not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            raise ValueError(f"{op}: {name} must fit in int64, got {value}")
    _sjlt_accumulate(G, _as_int(op, "offset", offset), _as_int(op, "s", s), _as_int(op, "seed", seed), out)
