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

TargetSampler = Callable[[Tensor], Tensor]


class SampleDraws:
    """Uniform random numbers in [0, 1) addressed by (seed, stage, draw, sample index, element).

    A counter-based generator: each number is a SplitMix64 hash of its address, so a
    sample's targets depend only on the seed and the sample's global index, never on
    how the data is cut into blocks, on the order blocks are read, or on how many
    processes share the job.

    Args:
        seed: the solver's seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._key = 0
        self._offset = 0

    def at(self, stage: int, draw: int, offset: int) -> None:
        """Addresses the next block: fitting stage, repeated draw number, global index of its first sample."""
        self._key = _mix64_int(_mix64_int(self.seed) + stage * 0x632BE59BD9B4E019 + draw * 0x9E3779B97F4A7C15)
        self._offset = int(offset)

    def uniforms(self, n: int, m: int, device: torch.device) -> Tensor:
        """(n, m) float64 uniforms in [0, 1): element j of sample ``offset + i``."""
        index = (self._offset + torch.arange(n, device=device, dtype=torch.int64)).unsqueeze(1) * m \
            + torch.arange(m, device=device, dtype=torch.int64)
        bits = _mix64_tensor(index + _signed(self._key))
        return _logical_shift(bits, 11).double() * 2.0 ** -53  # the top 53 bits as a fraction


def _mix64_int(z: int) -> int:
    mask = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def _signed(z: int) -> int:
    """A 64-bit pattern as the int64 with the same bits."""
    z &= (1 << 64) - 1
    return z - (1 << 64) if z >= 1 << 63 else z


def _logical_shift(z: Tensor, bits: int) -> Tensor:
    """z >> bits on the 64-bit patterns of int64 z (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64_tensor(z: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (two's-complement wrap-around = arithmetic mod 2^64)."""
    z = z + _signed(0x9E3779B97F4A7C15)
    z = (z ^ _logical_shift(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _logical_shift(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _logical_shift(z, 31)


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
