"""Sampled Fisher targets: counter-based draws, independent of how the data is cut into blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfluence as tfl
from torchfluence.counter_random import SampleDraws
from torchfluence.target_sampling import default_sampler

MASK = (1 << 64) - 1


def _mix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_uniforms_match_a_python_splitmix64():
    draws = SampleDraws(seed=12345)
    draws.at(stage=1, draw=2, offset=1_000_000_007)
    got = draws.uniforms(3, 5, torch.device("cpu"))
    key = _mix64(_mix64(12345) + 1 * 0x632BE59BD9B4E019 + 2 * 0x9E3779B97F4A7C15) & MASK
    expected = np.array([[(_mix64((((1_000_000_007 + i) * 5 + j) + key) & MASK) >> 11) * 2.0 ** -53
                          for j in range(5)] for i in range(3)])
    assert np.array_equal(got.numpy(), expected)  # exact: both are the same integer hash
    assert float(got.min()) >= 0 and float(got.max()) < 1


def test_a_sample_draws_the_same_targets_in_any_block():
    draws = SampleDraws(seed=3)
    sampler = default_sampler(F.cross_entropy, draws)
    logits = torch.randn(40, 6, dtype=torch.float64)
    draws.at(0, 0, 0)
    whole = sampler(logits)
    parts = []
    for start in range(0, 40, 7):
        draws.at(0, 0, start)
        parts.append(sampler(logits[start:start + 7]))
    assert torch.equal(whole, torch.cat(parts))


@pytest.mark.parametrize("loss", [F.cross_entropy, F.mse_loss, F.binary_cross_entropy_with_logits])
def test_draws_follow_the_predictive_distribution(loss):
    """Moments of 200k draws: within 5 standard errors of the distribution's (a fixed seed: cannot flake)."""
    draws = SampleDraws(seed=0)
    sampler = default_sampler(loss, draws)
    n = 200_000
    draws.at(0, 0, 0)
    if loss is F.cross_entropy:
        logits = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64).expand(n, 3)
        p = torch.softmax(logits[0], 0)
        freq = torch.bincount(sampler(logits), minlength=3).double() / n
        assert torch.all((freq - p).abs() < 5 * torch.sqrt(p * (1 - p) / n))
    elif loss is F.mse_loss:
        out = torch.zeros(n, 2, dtype=torch.float64)
        noise = sampler(out)  # variance c / 2 = 1 per element
        assert abs(float(noise.mean())) < 5 / (2 * n) ** 0.5
        assert abs(float(noise.var()) - 1) < 5 * (2 / (2 * n)) ** 0.5
    else:
        logits = torch.full((n, 1), 0.3, dtype=torch.float64)
        p = float(torch.sigmoid(torch.tensor(0.3)))
        assert abs(float(sampler(logits).mean()) - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_true_fisher_factors_do_not_depend_on_the_block_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(61, 5, dtype=torch.float64), torch.randint(0, 3, (61,))
    fitted = [tfl.EkfacInfluence(model, F.cross_entropy, 1e-3, block_size=b).fit((x, y)) for b in (7, 64)]
    for name in fitted[0].factors:
        a, b = fitted[0].factors[name], fitted[1].factors[name]
        # Same targets for every sample; only the summation order of the block sums differs (float64).
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-14)
