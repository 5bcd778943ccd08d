"""What the op modules share: dtype tables, argument checks, views of tensors for `_C`.

Private to :mod:`torchfluence.ops` (it plays the part of csrc/common.h). No module
outside the package reads the dtype tables: each op module says in a public
function what its kernels take.

Every check message names the op, the argument, what was expected and what was given.
"""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch
from torch import Tensor

from .._native import _C

# Input element types of the kernels (matches DType in csrc/common.h).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CPU_DTYPES = (torch.float32, torch.float64)
# Dtypes of scores and top-k values: the accumulation dtypes, on every device.
SCORE_DTYPES = (torch.float32, torch.float64)
# Element types `_C` can be told about: the inputs' and int64 (indices, status).
ELEMENT_CODES = {**DTYPE_CODES, torch.int64: 4}
INT64_MAX = 2**63 - 1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of scores and top-k values for inputs of `dtype` (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cuda_available_in_build() -> bool:
    """Whether this build of `_C` has the CUDA kernels (``build_info()["cuda"]``)."""
    return hasattr(_C, "influence_block_cuda")


def input_dtypes(device: Union[torch.device, str]) -> tuple:
    """Input dtypes the kernels read on `device`'s kind: float32/float64 on the CPU, also 16-bit on CUDA."""
    return CPU_DTYPES if torch.device(device).type == "cpu" else tuple(DTYPE_CODES)


def kernels_read(dtype: torch.dtype, device: Union[torch.device, str]) -> bool:
    """Whether the kernels on `device` read inputs of `dtype` (only CPU and CUDA devices have kernels)."""
    device = torch.device(device)
    return device.type in ("cpu", "cuda") and dtype in input_dtypes(device)


_cuda_limits_cache: Optional[dict] = None


def cuda_limits() -> dict:
    """Launch bounds of the CUDA kernels, as compiled (see csrc/cuda/*_cuda.h)."""
    global _cuda_limits_cache
    if _cuda_limits_cache is None:
        _cuda_limits_cache = dict(_C.cuda_limits())
    return _cuda_limits_cache


def stream(device: torch.device) -> int:
    """The handle of the caller's current CUDA stream on `device` (the kernels launch on it)."""
    return torch.cuda.current_stream(device).cuda_stream


# ---------------------------------------------------------------------------
# Argument checks.


def shape_str(shape) -> str:
    dims = tuple(int(s) for s in shape)
    return f"({dims[0]},)" if len(dims) == 1 else str(dims)


def got(t) -> str:
    """What was given, for a message: type, or layout, contiguity, shape, dtype and device."""
    if not isinstance(t, Tensor):
        return type(t).__name__
    if t.layout != torch.strided:
        return f"a {t.layout} tensor"
    layout = "" if t.is_contiguous() else "non-contiguous "
    return f"{layout}{shape_str(t.shape)} {t.dtype} on {t.device}"


def expect(
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
    what = f"a {'contiguous ' if contiguous else ''}{shape_str(shape)} {dtype} tensor on {device}"
    wrong_type = not isinstance(t, Tensor) or t.dtype != dtype
    raise (TypeError if wrong_type else ValueError)(f"{op}: {name} must be {what}, got {got(t)}")


def check_dtype_in(op: str, name: str, t: Tensor, allowed: Optional[tuple] = None) -> None:
    """`t`'s dtype must be in `allowed` (default: what the kernels read on its device)."""
    allowed = allowed if allowed is not None else input_dtypes(t.device)
    if t.dtype not in allowed:
        raise TypeError(
            f"{op}: {name} must have dtype in {[str(d) for d in allowed]} on {t.device.type}, got {t.dtype}"
        )


def check_input(op: str, name: str, t, ndim: int, doc: str, dtypes: Optional[tuple] = None) -> None:
    """A tensor the kernel only reads (any strides): type, rank, device kind and dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a {doc} torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a strided (dense) tensor, got {t.layout}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {doc}, got shape {shape_str(t.shape)}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} must be on a CPU or CUDA device, got {t.device}")
    check_dtype_in(op, name, t, dtypes)


def check_same(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """An input must share its dtype and device with the op's first input."""
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on {ref.device} like {ref_name}, got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have dtype {ref.dtype} like {ref_name}, got {t.dtype}")


def check_backend(op: str, device: torch.device) -> None:
    if device.type == "cuda" and not cuda_available_in_build():
        raise RuntimeError(
            f"{op}: tensors are on {device} but this torchfluence build has no CUDA kernels "
            "(build_info()['cuda'] is False); reinstall with TORCHFLUENCE_CUDA=ON"
        )


def check_non_overlapping(op: str, name: str, t: Tensor) -> None:
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
            f"{op}: {name} must not have overlapping elements, got shape {shape_str(t.shape)} with "
            f"strides {tuple(t.stride())}"
        )


def check_output(op: str, name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """An output the kernel writes through its strides: exact shape, dtype, device, no aliasing."""
    expect(op, name, t, shape, dtype, device, contiguous=False)
    check_non_overlapping(op, name, t)


def as_int(op: str, name: str, value) -> int:
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}") from None


def check_offset(op: str, offset, count: int) -> None:
    """offset >= 0 and offset + count fits in int64 (the kernels' global indices)."""
    offset = as_int(op, "offset", offset)
    if isinstance(offset, torch.SymInt):
        return  # traced: checked when the op runs
    if offset < 0:
        raise ValueError(f"{op}: offset must be >= 0, got {offset}")
    if offset > INT64_MAX:
        raise ValueError(f"{op}: offset must fit in int64 (<= 2**63 - 1), got {offset}")
    if offset > INT64_MAX - count:
        raise ValueError(
            f"{op}: offset + b must fit in int64 (global indices), got offset {offset} with b = {count}"
        )


def require_tensors(op: str, **tensors) -> None:
    """Type check ahead of the dispatcher (which would raise an unhelpful RuntimeError)."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


# ---------------------------------------------------------------------------
# The running top-k state that influence_block_update and topk_merge both update:
# largest_values, largest_indices, smallest_values, smallest_indices, status.

STATE_NAMES = ("largest_values", "largest_indices", "smallest_values", "smallest_indices", "status")


def state_k(op: str, largest_values, n_query: int, dtype: torch.dtype, device: torch.device) -> int:
    """k, read from largest_values (which `check_state` then checks in full)."""
    if not isinstance(largest_values, Tensor) or largest_values.dim() != 2:
        raise (TypeError if not isinstance(largest_values, Tensor) else ValueError)(
            f"{op}: largest_values must be a contiguous (n_query, k) = ({n_query}, k) {dtype} tensor on "
            f"{device}, got {got(largest_values)}"
        )
    k = int(largest_values.shape[1])
    if k < 1:
        raise ValueError(
            f"{op}: the top-k state must have k >= 1 columns, got largest_values "
            f"{shape_str(largest_values.shape)} (for scores alone compute S @ G.T)"
        )
    return k


def check_state(
    op: str, n_query: int, k: int, dtype: torch.dtype, device: torch.device, state: tuple
) -> None:
    """`state` is (largest_values, largest_indices, smallest_values, smallest_indices, status)."""
    for name, t in zip(STATE_NAMES[:4], state):
        expect(op, name, t, (n_query, k), torch.int64 if name.endswith("indices") else dtype, device)
    expect(op, "status", state[4], (3,), torch.int64, device)


def require_state(op: str, offset, state: tuple) -> int:
    """The public wrappers' checks of the state and offset ahead of the dispatcher; returns the offset."""
    require_tensors(op, **dict(zip(STATE_NAMES, state)))
    check_offset(op, offset, 0)  # in int64 range for the dispatcher; the op checks offset + b
    return as_int(op, "offset", offset)


# ---------------------------------------------------------------------------
# Views of tensors for `_C` (data pointer, sizes, strides in elements, element type).


def matrix_ref(t: Optional[Tensor]):
    if t is None:
        return _C.MatrixRef()
    return _C.MatrixRef(t.data_ptr(), *t.shape, *t.stride(), ELEMENT_CODES[t.dtype])


def vector_ref(t: Optional[Tensor]):
    if t is None:
        return _C.VectorRef()
    return _C.VectorRef(t.data_ptr(), t.shape[0], t.stride(0), ELEMENT_CODES[t.dtype])


def tensor3_ref(t: Tensor):
    return _C.Tensor3Ref(t.data_ptr(), *t.shape, *t.stride(), ELEMENT_CODES[t.dtype])


def topk_ref(state: tuple):
    """The four lists of a top-k state (largest/smallest values and indices) for `_C`."""
    return _C.TopKRef(*(matrix_ref(t) for t in state[:4]))
