"""Counter-based random numbers: each number is a SplitMix64 hash of its address.

A draw depends only on its seed and its address (a stream index, a sample's global
index, an element), never on how the data is cut into blocks, the order blocks are
read, the device, or how many processes share the job. Two users:

- :class:`SampleDraws`: uniforms for the true Fisher's sampled targets
  (:mod:`torchfluence.target_sampling`), hashed on the device as int64 tensors;
- :func:`stream_seed`: the seeds of the projectors' ``torch.Generator`` streams
  (:mod:`torchfluence.projectors`).

SplitMix64 (Steele, Lea and Flood 2014) adds the golden-ratio increment to its state
and mixes the result with :func:`mix64`. The plain-NumPy twin of the compiled sparse
JL kernel's hash lives in :mod:`torchfluence.reference`, apart on purpose: it is the
tests' oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GOLDEN", "SampleDraws", "mix64", "splitmix64", "splitmix64_tensor", "stream_seed"]

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / the golden ratio, odd
_STAGE = 0x632BE59BD9B4E019  # SampleDraws' stride between fitting stages (another odd constant)


def mix64(z: int) -> int:
    """SplitMix64's finaliser on the 64-bit pattern of `z`: a bijection of [0, 2^64)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def splitmix64(z: int) -> int:
    """SplitMix64's output for state `z`: the finaliser of ``z + GOLDEN``, in [0, 2^64)."""
    return mix64(z + GOLDEN)


def stream_seed(seed: int, stream: int) -> int:
    """Seed of an independent ``torch.Generator`` stream: SplitMix64 output `stream` of `seed`, 63 bits."""
    return mix64(splitmix64(seed) + (stream + 1) * GOLDEN) >> 1


def as_int64(z: int) -> int:
    """A 64-bit pattern as the int64 with the same bits."""
    z &= MASK64
    return z - (1 << 64) if z >= 1 << 63 else z


def logical_shift(z: Tensor, bits: int) -> Tensor:
    """z >> bits on the 64-bit patterns of int64 z (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64_tensor(z: Tensor) -> Tensor:
    """:func:`splitmix64` on int64 tensors: the same bits, as int64 (wrap-around is arithmetic mod 2^64)."""
    z = z + as_int64(GOLDEN)
    z = (z ^ logical_shift(z, 30)) * as_int64(0xBF58476D1CE4E5B9)
    z = (z ^ logical_shift(z, 27)) * as_int64(0x94D049BB133111EB)
    return z ^ logical_shift(z, 31)


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
        self._key = splitmix64(splitmix64(self.seed) + stage * _STAGE + draw * GOLDEN)
        self._offset = int(offset)

    def uniforms(self, n: int, m: int, device: torch.device) -> Tensor:
        """(n, m) float64 uniforms in [0, 1): element j of sample ``offset + i``."""
        index = (self._offset + torch.arange(n, device=device, dtype=torch.int64)).unsqueeze(1) * m \
            + torch.arange(m, device=device, dtype=torch.int64)
        bits = splitmix64_tensor(index + as_int64(self._key))
        return logical_shift(bits, 11).double() * 2.0 ** -53  # the top 53 bits as a fraction
