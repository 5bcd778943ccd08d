"""Arithmetic precision of the library's own matrix products.

Three rules, the same on every device except where the third says so:

- **float32 means IEEE float32.** torch lets a process turn on TF32 for all
  float32 matmuls (``torch.backends.cuda.matmul.allow_tf32``); products under
  that flag carry ~1e-3 relative error, so the library's own products (factor
  covariances, solves, scoring GEMMs) run with it off (:func:`matmul_precision`)
  unless the caller asks for TF32. The model's own convolutions follow the
  caller's ``torch.backends.cudnn.allow_tf32`` (torch's default is on): they are
  the model's forward and backward, run as the caller configured them.
- **16-bit scoring keeps 32-bit scores.** With ``score_dtype=torch.bfloat16``
  (or float16) the operands of the scoring products are 16-bit and run on
  tensor cores, but the products are accumulated and returned in float32
  (:func:`matmul_float32`); scores are never rounded to 16 bits.
- **16-bit factors keep 32-bit sums.** With ``factor_dtype=torch.bfloat16`` (K-FAC,
  EK-FAC) the operands of the fit's products (covariances, rotations into the
  eigenbasis) and of the query preconditioning are rounded to 16 bits, and every
  product is accumulated and returned in float32 (:func:`matmul_float32`); sums over
  samples run in float32 and float64, eigendecompositions in float64. On a CPU that
  multiplies bf16 natively (AVX512-BF16 or AMX) the factor products run as bf16
  GEMMs with float32 accumulation, 2.5x faster than float32 on AVX512-BF16, and
  torch returns their results rounded to bf16 (:func:`factor_matmul`). On other
  CPUs the same operand rounding is applied and the products run in float32,
  without a speed-up.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

SCORE_DTYPES = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def matmul_precision(allow_tf32: bool) -> Iterator[None]:
    """Runs the block with CUDA float32 matmuls in IEEE precision (TF32 when `allow_tf32`).

    The caller's setting is restored on exit, also after an exception.
    """
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    if previous == allow_tf32:
        yield
        return
    matmul.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


def check_low_precision(value: Optional[torch.dtype], dtype: torch.dtype, name: str) -> Optional[torch.dtype]:
    """Validates a 16-bit option `name` (``score_dtype``, ``factor_dtype``, ``capture_dtype``):
    None (the computation dtype), torch.bfloat16 or torch.float16; returns None for the computation dtype."""
    if value is None or value == dtype:
        return None
    if value not in SCORE_DTYPES:
        raise ValueError(f"{name} must be None (the computation dtype, {dtype}), torch.bfloat16 or "
                         f"torch.float16, got {value}")
    if dtype == torch.float64:
        raise ValueError(f"{name}={value} with dtype=torch.float64 would throw the float64 "
                         "computation away; use float32 (dtype=None on a float32 model) for 16-bit operands")
    return value


def check_score_dtype(score_dtype: Optional[torch.dtype], dtype: torch.dtype) -> Optional[torch.dtype]:
    """Validates ``score_dtype`` (:func:`check_low_precision`)."""
    return check_low_precision(score_dtype, dtype, "score_dtype")


def _has_out_dtype_mm() -> bool:
    return "dtype" in torch.ops.aten.mm.overloads()


_OUT_DTYPE_MM = _has_out_dtype_mm()


def matmul_float32(a: Tensor, b: Tensor, operand_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``a @ b`` (2-D, or batched 3-D as torch.matmul takes them), in float32 for 16-bit operands.

    Args:
        a, b: operands of one dtype.
        operand_dtype: a 16-bit dtype to round both operands to first (None: as they are).

    16-bit operands on CUDA run as one tensor-core GEMM with float32 accumulation and
    output (``out_dtype=torch.float32``, torch >= 2.8). Elsewhere (CPU, older torch) the
    16-bit operands are widened first: the same rounding of the operands, never less
    accurate. Other dtypes: plain ``a @ b`` (float64 stays float64).
    """
    if operand_dtype is not None:
        a, b = a.to(operand_dtype), b.to(operand_dtype)
    if a.dtype not in SCORE_DTYPES:
        return a @ b
    if not (a.is_cuda and _OUT_DTYPE_MM):
        return a.float() @ b.float()
    f32 = torch.float32
    if b.dim() == 2:  # (..., m, k) @ (k, n): the batch folds into the rows
        return torch.mm(a.reshape(-1, a.shape[-1]), b, out_dtype=f32).reshape(*a.shape[:-1], b.shape[-1])
    if a.dim() == 2 and b.dim() == 3:
        return torch.bmm(a.expand(b.shape[0], *a.shape), b, out_dtype=f32)
    if a.dim() == 3 and b.dim() == 3:
        return torch.bmm(a, b, out_dtype=f32)
    return (a @ b).float()


def _multiplies_bf16_natively() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles).

    Read once from the hardware (never timed), so every process on a machine takes the
    same route; False where torch cannot say or has no oneDNN to run bf16 GEMMs with.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


NATIVE_BF16_CPU = _multiplies_bf16_natively()


def native_16bit_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `device` multiplies `dtype` (16-bit) operands natively, accumulating in float32:
    any CUDA device, and bf16 on a CPU with bf16 instructions (:data:`NATIVE_BF16_CPU`)."""
    device = torch.device(device)
    if dtype not in SCORE_DTYPES:
        return False
    return device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16 and NATIVE_BF16_CPU)


def rounds_factor_results(device: torch.device, operand_dtype: Optional[torch.dtype]) -> bool:
    """Whether :func:`factor_matmul` on `device` returns results rounded to `operand_dtype`
    (a CPU with native bf16 products: torch exposes no float32-output bf16 GEMM there)."""
    return torch.device(device).type == "cpu" and operand_dtype is not None and native_16bit_products(
        device, operand_dtype)


def factor_matmul(a: Tensor, b: Tensor, operand_dtype: Optional[torch.dtype]) -> Tensor:
    """``a @ b`` for K-FAC's and EK-FAC's factor products (covariances, rotations into and
    out of the Kronecker eigenbasis), with `operand_dtype` operands (None: as they are).

    As :func:`matmul_float32`, except on a CPU that multiplies bf16 natively
    (:data:`NATIVE_BF16_CPU`): there the product is one oneDNN bf16 GEMM with float32
    accumulation, whose result torch rounds to bf16 (no float32-output bf16 GEMM is
    exposed on the CPU), then widened to float32. The factor products tolerate that
    rounding: a rotation's result is rounded to bf16 as the next product's operand
    anyway; covariances and squared rotated gradients are rounded per block of samples
    (relative at most 2^-8, independent between blocks) before the float64 sums over blocks.
    Scores never take this route (:func:`matmul_float32` keeps them float32).
    """
    if rounds_factor_results(a.device, operand_dtype):
        return (a.to(operand_dtype) @ b.to(operand_dtype)).float()
    return matmul_float32(a, b, operand_dtype)
