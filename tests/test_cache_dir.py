"""Head mode's cache_dir: solvers that share one never read each other's training features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import torchfluence as tfl


def _frozen_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def test_shared_cache_dir_keeps_each_solvers_features(tmp_path):
    """Two head-mode solvers on different training data, one cache_dir: fitting the second left the
    first one's memory-mapped features (and so its scores) untouched."""
    model = _frozen_model()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)
    y1, y2 = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (30,), generator=g)
    xt, yt = x1[:4], y1[:4]
    first = tfl.DirectInfluence(model, F.cross_entropy, 0.1, head=True, cache_dir=tmp_path).fit((x1, y1))
    before = first.train_influences(xt, yt).clone()
    second = tfl.DirectInfluence(model, F.cross_entropy, 0.1, head=True, cache_dir=tmp_path).fit((x2, y2))
    assert first.features.cache_path != second.features.cache_path  # keyed by what they hold
    assert torch.equal(first.train_influences(xt, yt), before)
    in_memory = tfl.DirectInfluence(model, F.cross_entropy, 0.1, head=True).fit((x2, y2))
    torch.testing.assert_close(second.train_influences(xt, yt), in_memory.train_influences(xt, yt))


def test_same_features_share_one_file(tmp_path):
    """A rerun on the same model and data replaces the file by an identical one; no partial files stay."""
    model = _frozen_model()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    a = tfl.DirectInfluence(model, F.cross_entropy, 0.1, head=True, cache_dir=tmp_path).fit((x, y))
    scores = a.train_influences(x[:2], y[:2]).clone()
    b = tfl.DirectInfluence(model, F.cross_entropy, 0.1, head=True, cache_dir=tmp_path).fit((x, y))
    assert a.features.cache_path == b.features.cache_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [a.features.cache_path.name]
    assert torch.equal(a.train_influences(x[:2], y[:2]), scores)
