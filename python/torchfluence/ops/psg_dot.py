"""psg_dot_accumulate: scores of one captured layer without per-sample gradients (csrc/*/psg_dot.*)."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from .._native import _C
from . import _common


def supports(dtype: torch.dtype, device: Union[torch.device, str]) -> bool:
    """Whether the kernel reads Q, A and D of `dtype` on `device`.

    float32 and float64 on the CPU; also float16 and bfloat16 on CUDA (accumulated in float32).
    """
    return _common.kernels_read(dtype, device)


def check_dtype(caller: str, name: str, t: Tensor) -> None:
    """Raises TypeError, naming `caller` and the argument `name`, unless the kernels read `t`'s dtype.

    float32 and float64 on the CPU; on any other device also float16 and bfloat16.
    """
    _common.check_dtype_in(caller, name, t)


def _check(Q, A, D, scores) -> None:
    op = "psg_dot_accumulate"
    _common.check_input(op, "Q", Q, 2, "(n_query, d_out * d_in)")
    _common.check_input(op, "A", A, 3, "(b, T, d_in)")
    _common.check_input(op, "D", D, 3, "(b, T, d_out)")
    _common.check_same(op, "A", A, "Q", Q)
    _common.check_same(op, "D", D, "Q", Q)
    _common.check_backend(op, Q.device)
    if A.shape[:2] != D.shape[:2]:
        raise ValueError(
            f"{op}: A (b, T, d_in) and D (b, T, d_out) must agree in b and T, got "
            f"{_common.shape_str(A.shape)} and {_common.shape_str(D.shape)}"
        )
    d_in, d_out = A.shape[2], D.shape[2]
    if Q.shape[1] != d_out * d_in:
        raise ValueError(
            f"{op}: Q must have d_out * d_in = {d_out} * {d_in} = {d_out * d_in} columns, got "
            f"{_common.shape_str(Q.shape)}"
        )
    acc = _common.accumulation_dtype(Q.dtype)
    _common.check_output(op, "scores", scores, (Q.shape[0], A.shape[0]), acc, Q.device)


def _args(Q: Tensor, A: Tensor, D: Tensor, scores: Tensor):
    return _C.PsgDotArgs(
        _common.DTYPE_CODES[Q.dtype],
        _common.matrix_ref(Q),
        _common.tensor3_ref(A),
        _common.tensor3_ref(D),
        _common.matrix_ref(scores),
    )


@torch.library.custom_op("torchfluence::psg_dot_accumulate", mutates_args=("scores",))
def _psg_dot_accumulate(Q: Tensor, A: Tensor, D: Tensor, scores: Tensor) -> None:
    _check(Q, A, D, scores)
    n_query, b = Q.shape[0], A.shape[0]
    if n_query == 0 or b == 0:
        return
    if Q.device.type == "cpu":
        _C.psg_dot_cpu(_args(Q, A, D, scores))
        return
    limits = _common.cuda_limits()
    q_step, j_step = limits["psg_dot_max_query_rows"], limits["psg_dot_max_samples"]
    with torch.cuda.device(Q.device):
        handle = _common.stream(Q.device)
        # One launch covers a bounded grid: larger calls go in (query, sample) pieces.
        for q0 in range(0, n_query, q_step):
            for j0 in range(0, b, j_step):
                q, a, d = Q[q0 : q0 + q_step], A[j0 : j0 + j_step], D[j0 : j0 + j_step]
                _C.psg_dot_cuda(_args(q, a, d, scores[q0 : q0 + q_step, j0 : j0 + j_step]), handle)


@_psg_dot_accumulate.register_fake
def _(Q, A, D, scores):
    # In-place accumulation with no return value: nothing for tracing to infer.
    # The fake lets torch.compile trace through and runs the eager checks.
    _check(Q, A, D, scores)
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
    _common.require_tensors("psg_dot_accumulate", Q=Q, A=A, D=D, scores=scores)
    _psg_dot_accumulate(Q, A, D, scores)
