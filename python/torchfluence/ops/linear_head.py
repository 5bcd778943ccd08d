"""linear_head_hvp_accumulate: closed-form Hessian-vector products of a linear head (csrc/*/linear_head.*)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._native import _C
from . import _common

# Matches HeadLoss in csrc/linear_head_args.h.
_LOSS_CODES = {"cross_entropy": 0, "mse": 1, "bce_with_logits": 2}


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernel takes features, weight, bias and vectors of `dtype`.

    float32 and float64, on the CPU and on CUDA.
    """
    return dtype in _common.CPU_DTYPES


def _check(features, weight, bias, vectors, loss, n_total, out) -> tuple[int, int, int]:
    op = "linear_head_hvp_accumulate"
    _common.check_input(op, "features", features, 2, "(n, d)", _common.CPU_DTYPES)
    _common.check_input(op, "weight", weight, 2, "(C, d)", _common.CPU_DTYPES)
    _common.check_same(op, "weight", weight, "features", features)
    _common.check_backend(op, features.device)
    dtype, device = features.dtype, features.device
    (n, d), C = features.shape, weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(
            f"{op}: weight must have d = {d} columns like features {_common.shape_str(features.shape)}, got "
            f"{_common.shape_str(weight.shape)}"
        )
    if bias is not None:
        _common.expect(op, "bias", bias, (C,), dtype, device)
    if not isinstance(loss, str) or loss not in _LOSS_CODES:
        raise ValueError(f"{op}: loss must be one of {list(_LOSS_CODES)}, got {loss!r}")
    n_total = _common.as_int(op, "n_total", n_total)
    if not isinstance(n_total, torch.SymInt) and n_total < 1:
        raise ValueError(f"{op}: n_total must be >= 1, got {n_total}")
    d1 = d + (bias is not None)
    if not isinstance(vectors, Tensor) or vectors.dim() != 3:
        raise (TypeError if not isinstance(vectors, Tensor) else ValueError)(
            f"{op}: vectors must be a contiguous (k, C, d1) = (k, {C}, {d1}) {dtype} tensor on {device}, "
            f"got {_common.got(vectors)}"
        )
    k = vectors.shape[0]
    _common.expect(op, "vectors", vectors, (k, C, d1), dtype, device)
    _common.expect(op, "out", out, (k, C, d1), dtype, device)
    if device.type == "cuda" and C > _common.cuda_limits()["linear_head_max_vector_classes"]:
        raise ValueError(
            f"{op}: at most {_common.cuda_limits()['linear_head_max_vector_classes']} classes per CUDA call, "
            f"got weight {_common.shape_str(weight.shape)}"
        )
    return n, C, k


@torch.library.custom_op("torchfluence::linear_head_hvp_accumulate", mutates_args=("out",))
def _linear_head_hvp_accumulate(features: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor,
                                loss: str, n_total: int, out: Tensor) -> None:
    n, C, k = _check(features, weight, bias, vectors, loss, n_total, out)
    if n == 0 or k == 0 or C == 0:
        return

    def args(v: Tensor, o: Tensor, workspace: Optional[Tensor] = None):
        ptr, size = (0, 0) if workspace is None else (workspace.data_ptr(), workspace.nbytes)
        return _C.LinearHeadArgs(
            _common.DTYPE_CODES[features.dtype],
            _LOSS_CODES[loss],
            _common.matrix_ref(features),
            _common.matrix_ref(weight),
            _common.vector_ref(bias),
            _common.tensor3_ref(v),
            _common.tensor3_ref(o),
            n_total,
            ptr,
            size,
        )

    if features.device.type == "cpu":
        _C.linear_head_hvp_cpu(args(vectors, out))
        return
    limits = _common.cuda_limits()
    # One launch has a CTA row per (vector, class) and a thread per (vector, sample):
    # larger calls go in pieces of vectors (each piece is contiguous along dim 0).
    step = max(
        1, min(limits["linear_head_max_vector_classes"] // C, limits["linear_head_max_vector_samples"] // n)
    )
    if limits["linear_head_max_vector_samples"] // n < 1:
        raise ValueError(
            f"linear_head_hvp_accumulate: at most {limits['linear_head_max_vector_samples']} samples per "
            f"CUDA call, got features {_common.shape_str(features.shape)}"
        )
    with torch.cuda.device(features.device):
        handle = _common.stream(features.device)
        for v0 in range(0, k, step):
            v, o = vectors[v0 : v0 + step], out[v0 : v0 + step]
            workspace = torch.empty(n * C * (v.shape[0] + 1), dtype=features.dtype, device=features.device)
            _C.linear_head_hvp_cuda(args(v, o, workspace), handle)


@_linear_head_hvp_accumulate.register_fake
def _(features, weight, bias, vectors, loss, n_total, out):
    # Accumulates into `out` in place; nothing to describe for tracing. The fake
    # lets torch.compile trace through and runs the eager checks.
    _check(features, weight, bias, vectors, loss, n_total, out)
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
    _common.require_tensors(op, features=features, weight=weight, vectors=vectors, out=out)
    if bias is not None:
        _common.require_tensors(op, bias=bias)
    if not isinstance(loss, str):
        raise TypeError(f"{op}: loss must be a str, one of {list(_LOSS_CODES)}, got {type(loss).__name__}")
    n_total = _common.as_int(op, "n_total", n_total)
    if not isinstance(n_total, torch.SymInt) and not 1 <= n_total <= _common.INT64_MAX:
        raise ValueError(f"{op}: n_total must be >= 1 and fit in int64, got {n_total}")
    _linear_head_hvp_accumulate(features, weight, bias, vectors, loss, n_total, out)
