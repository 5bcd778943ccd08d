"""Exact curvature of a linear head ``logits = X W^T + b`` in closed form.

The logits are linear in (W, b), so the Hessian of the mean loss equals its
Gauss-Newton matrix: ``H = (1/n) sum_i h_i (x) x~_i x~_i^T`` with ``x~_i = [x_i, 1]``
and ``h_i`` the loss's Hessian in the logits:

- cross-entropy: ``diag(p_i) - p_i p_i^T`` (p = softmax of the logits);
- ``F.mse_loss`` (mean over n x C): ``(2 / C) I``;
- ``F.binary_cross_entropy_with_logits`` (mean over n x C): ``diag(s_i (1 - s_i)) / C`` (s = sigmoid).

``H V = (1/n) sum_i [h_i (V x~_i)] x~_i^T`` costs two matrix products per block of
samples, with no autograd graph and no pass through anything but the features.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import linear_head as head_kernel
from .ops import linear_head_hvp_accumulate

HeadLoss = Literal["cross_entropy", "mse", "bce_with_logits"]

_BLOCK = 4096  # samples per block of the explicit Hessian's (block, C, C) intermediates
_WORKSPACE = 1 << 24  # elements of the CUDA kernel's per-call workspace


def loss_kind(loss: Callable) -> Optional[HeadLoss]:
    """Which closed form `loss` has, or None (then the generic autograd path is used)."""
    if loss is F.cross_entropy or (isinstance(loss, nn.CrossEntropyLoss) and _plain(loss)):
        return "cross_entropy"
    if loss is F.mse_loss or (isinstance(loss, nn.MSELoss) and loss.reduction == "mean"):
        return "mse"
    if loss is F.binary_cross_entropy_with_logits or (
            isinstance(loss, nn.BCEWithLogitsLoss) and loss.reduction == "mean" and loss.weight is None
            and loss.pos_weight is None):
        return "bce_with_logits"
    return None


def _plain(loss: nn.CrossEntropyLoss) -> bool:
    return loss.reduction == "mean" and loss.weight is None and loss.label_smoothing == 0


def linear_head_hvp(features: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor,
                    loss: HeadLoss = "cross_entropy", *, kernel: Optional[bool] = None) -> Tensor:
    """Hessian of the mean loss of a linear head times each of `vectors`.

    Args:
        features: (n, d) inputs of the head.
        weight: (C, d); bias: (C,) or None.
        vectors: (k, C, d + 1) with a bias, (k, C, d) without (bias last column).
        loss: ``"cross_entropy"``, ``"mse"`` or ``"bce_with_logits"``.

    Returns:
        (k, C, d[+1]) like `vectors`. The targets do not enter: none of these
        Hessians depends on them.

    ``kernel`` picks the implementation: the compiled kernel (logits, the loss's
    Hessian in the logits and both products fused, one pass over the samples),
    or the same closed form as tensor operations. Default: the kernel on the CPU,
    tensor operations (cuBLAS) on CUDA, where the kernel has not been measured
    faster yet.
    """
    _check(features, weight, bias, vectors)
    if loss not in ("cross_entropy", "mse", "bce_with_logits"):
        raise ValueError(f"linear_head: loss must be 'cross_entropy', 'mse' or 'bce_with_logits', got {loss!r}")
    dtype = vectors.dtype
    if not head_kernel.supports(dtype) or any(
            t.dtype != dtype or t.device != vectors.device for t in (features, weight) + ((bias,) if bias is not None else ())):
        raise TypeError(f"linear_head: features, weight, bias and vectors must share one dtype (float32 or float64) "
                        f"and device, got {features.dtype}/{weight.dtype}/{vectors.dtype}")
    n, C, k = features.shape[0], weight.shape[0], vectors.shape[0]
    if not (features.device.type == "cpu" if kernel is None else kernel):
        return _closed_form(features, weight, bias, vectors, loss)
    vectors = vectors.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.zeros_like(vectors)
    if features.device.type == "cpu":
        linear_head_hvp_accumulate(features, weight, bias, vectors, loss, n, out)
        return out
    # The CUDA kernel launches one CTA row per (vector, class), at most 65535, and keeps
    # (k + 1) x n x C values per call: split the vectors, then the samples.
    k_step = max(1, 65535 // C)
    for v0 in range(0, k, k_step):
        v, o = vectors[v0:v0 + k_step], out[v0:v0 + k_step]
        block = max(1, _WORKSPACE // max(1, C * (v.shape[0] + 1)))
        for start in range(0, n, block):
            linear_head_hvp_accumulate(features[start:start + block], weight, bias, v, loss, n, o)
    return out


def _closed_form(features: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor,
                 loss: HeadLoss) -> Tensor:
    """The closed form with tensor operations, in blocks of samples."""
    n, d = features.shape
    C = weight.shape[0]
    out = torch.zeros_like(vectors)
    for start in range(0, n, _BLOCK):
        x = features[start:start + _BLOCK]
        logits = F.linear(x, weight, bias)
        u = torch.einsum("bd,kcd->bkc", x, vectors[..., :d])
        if bias is not None:
            u = u + vectors[..., d]
        if loss == "cross_entropy":
            p = torch.softmax(logits, dim=1).unsqueeze(1)
            r = p * u - p * (p * u).sum(dim=2, keepdim=True)
        elif loss == "mse":
            r = u * (2.0 / C)
        else:
            s = torch.sigmoid(logits).unsqueeze(1)
            r = u * (s * (1 - s)) / C
        out[..., :d] += torch.einsum("bkc,bd->kcd", r, x)
        if bias is not None:
            out[..., d] += r.sum(dim=0)
    return out / n


def linear_head_hessian(features: Tensor, weight: Tensor, bias: Optional[Tensor],
                        loss: HeadLoss = "cross_entropy") -> Tensor:
    """The explicit Hessian, (C (d[+1]), C (d[+1])), in the row-major order of (C, d[+1]) matrices.

    Meant for direct solves when ``C * d`` is small: memory is its square.
    """
    n, d = features.shape
    C = weight.shape[0]
    d1 = d + (bias is not None)
    total = features.new_zeros(C * d1, C * d1)
    for start in range(0, n, _BLOCK):
        x = features[start:start + _BLOCK]
        logits = F.linear(x, weight, bias)
        xt = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if bias is not None else x
        h = _logit_hessians(logits, loss)  # (b, C, C)
        total += torch.einsum("bce,bi,bj->ciej", h, xt, xt).reshape(C * d1, C * d1)
    return total / n


def _logit_hessians(logits: Tensor, loss: HeadLoss) -> Tensor:
    b, C = logits.shape
    if loss == "cross_entropy":
        p = torch.softmax(logits, dim=1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    if loss == "mse":
        return torch.eye(C, dtype=logits.dtype, device=logits.device).expand(b, C, C) * (2.0 / C)
    s = torch.sigmoid(logits)
    return torch.diag_embed(s * (1 - s) / C)


def _check(features: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor) -> None:
    if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_head: features (n, d) and weight (C, d) must agree in d, got "
                         f"{tuple(features.shape)} and {tuple(weight.shape)}")
    C, d = weight.shape
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"linear_head: bias must have shape ({C},), got {tuple(bias.shape)}")
    d1 = d + (bias is not None)
    if vectors.dim() != 3 or tuple(vectors.shape[1:]) != (C, d1):
        raise ValueError(f"linear_head: vectors must have shape (k, {C}, {d1}), got {tuple(vectors.shape)}")
