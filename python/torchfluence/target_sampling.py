"""Targets drawn from the model's predictive distribution (for the true Fisher).

The Fisher E_{y ~ p(y|x)}[g g^T] equals the Gauss-Newton matrix for losses that
are negative log-likelihoods; the empirical Fisher (y from the data) does not,
and is a poor curvature estimate away from a perfect fit (Kunstner et al. 2019).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .counter_random import SampleDraws

TargetSampler = Callable[[Tensor], Tensor]


def default_sampler(loss: Callable, draws: SampleDraws) -> Optional[TargetSampler]:
    """A sampler for the common losses, or None when the loss is not recognised.

    Its random numbers come from `draws`, addressed by each sample's global index.
    """
    if isinstance(loss, nn.CrossEntropyLoss) or loss is F.cross_entropy:
        def categorical(outputs: Tensor) -> Tensor:
            logits = outputs.movedim(1, -1) if outputs.dim() > 2 else outputs  # (n, C, ...) -> (n, ..., C)
            probs = torch.softmax(logits.double(), dim=-1)
            n, c = probs.shape[0], probs.shape[-1]
            u = draws.uniforms(n, probs[0].numel() // c, probs.device).reshape(probs.shape[:-1])
            # Inverse CDF: the first class whose cumulative probability exceeds u.
            drawn = (probs.cumsum(dim=-1) <= u.unsqueeze(-1)).sum(dim=-1)
            return drawn.clamp_max(c - 1)
        return categorical
    if isinstance(loss, nn.BCEWithLogitsLoss) or loss is F.binary_cross_entropy_with_logits:
        def bernoulli(outputs: Tensor) -> Tensor:
            u = draws.uniforms(outputs.shape[0], outputs[0].numel(), outputs.device).reshape(outputs.shape)
            return (u < torch.sigmoid(outputs.double())).to(outputs.dtype)
        return bernoulli
    if isinstance(loss, nn.MSELoss) or loss is F.mse_loss:
        def gaussian(outputs: Tensor) -> Tensor:
            # Per-sample loss (1/c) ||o - y||^2 has output Hessian (2/c) I; noise of
            # variance c/2 makes the gradients' covariance match it.
            c = outputs[0].numel()
            u = draws.uniforms(outputs.shape[0], 2 * c, outputs.device)
            # Box-Muller; 1 - u is in (0, 1], so the logarithm is finite.
            noise = torch.sqrt(-2 * torch.log1p(-u[:, :c])) * torch.cos(2 * math.pi * u[:, c:])
            return outputs + math.sqrt(c / 2) * noise.reshape(outputs.shape).to(outputs.dtype)
        return gaussian
    return None


def token_cross_entropy_sampler(loss: Callable, outputs: Tensor, targets: Tensor,
                                draws: SampleDraws) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """A sampler for a loss written as cross-entropy over the last dimension, or None.

    The language-model loss ``F.cross_entropy(logits.flatten(0, 1), y.flatten(),
    ignore_index=-100)`` is a lambda that :func:`default_sampler` cannot recognise by
    identity; here it is recognised by its values: on the given outputs, and on a
    rescaled copy of them, it must equal that cross-entropy. The sampler draws every
    position's class from the model's softmax and keeps the -100 of the positions the
    data's targets mask, so each sequence's loss averages over the same tokens.

    Args:
        outputs: (b, ..., C) a few samples' outputs; targets: (b, ...) their class indices.

    Returns:
        ``(outputs, targets) -> drawn targets`` (marked ``needs_targets``), or None.
    """
    if targets.is_floating_point() or outputs.dim() != targets.dim() + 1 or outputs.shape[:-1] != targets.shape:
        return None

    def reference(o: Tensor) -> Tensor:
        return F.cross_entropy(o.reshape(-1, o.shape[-1]), targets.reshape(-1), ignore_index=-100)

    try:
        for o in (outputs, 0.5 * outputs + 1):
            got = loss(o, targets)
            if not (isinstance(got, Tensor) and got.dim() == 0 and torch.allclose(got, reference(o), rtol=1e-6)):
                return None
    except Exception:  # noqa: BLE001 - a loss that cannot take these is not this loss
        return None

    def categorical(outputs: Tensor, targets: Tensor) -> Tensor:
        probs = torch.softmax(outputs.double(), dim=-1)
        n, c = probs.shape[0], probs.shape[-1]
        u = draws.uniforms(n, probs[0].numel() // c, probs.device).reshape(probs.shape[:-1])
        drawn = (probs.cumsum(dim=-1) <= u.unsqueeze(-1)).sum(dim=-1).clamp_max(c - 1)
        return drawn.masked_fill(targets.to(drawn.device) == -100, -100)

    categorical.needs_targets = True  # type: ignore[attr-defined]
    return categorical


def exact_output_grads(loss: Callable, outputs: Tensor) -> Optional[Tensor]:
    """Vectors whose outer products sum to each sample's output Hessian, or None if unknown.

    For cross-entropy, diag(p) - p p^T = sum_c p_c (p - e_c)(p - e_c)^T, so the
    C vectors sqrt(p_c) (p - e_c) backpropagated as output gradients give the
    Fisher's exact expectation over the model's predictive distribution; for
    MSE, (2/c) I = sum_k (sqrt(2/c) e_k)(sqrt(2/c) e_k)^T.

    Args:
        outputs: (n, C) model outputs.

    Returns:
        (K, n, C) output gradients, K = C.
    """
    if outputs.dim() != 2:
        return None
    n, c = outputs.shape
    eye = torch.eye(c, dtype=outputs.dtype, device=outputs.device)
    if isinstance(loss, nn.CrossEntropyLoss) or loss is F.cross_entropy:
        p = torch.softmax(outputs, dim=1)  # (n, C)
        return p.sqrt().T[:, :, None] * (p[None, :, :] - eye[:, None, :])  # [k, i] = sqrt(p_ik) (p_i - e_k)
    if isinstance(loss, nn.MSELoss) or loss is F.mse_loss:
        return math.sqrt(2 / c) * eye[:, None, :].expand(c, n, c)
    return None
