"""The job runner (torchfluence.scoring): several results from one pass, any data source, kept work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchfluence as tfl
from torchfluence import journal

N, N_TEST, BLOCK = 70, 5, 16


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x, y = torch.randn(N, 6, dtype=torch.float64), torch.randint(0, 3, (N,))
    xt, yt = torch.randn(N_TEST, 6, dtype=torch.float64), torch.randint(0, 3, (N_TEST,))
    return model, x, y, xt, yt


@pytest.mark.parametrize("solver", [tfl.DirectInfluence, tfl.EkfacInfluence])
def test_top_k_with_scores_fills_the_matrix_in_the_same_pass(solver, tmp_path):
    model, x, y, xt, yt = problem()
    im = solver(model, F.cross_entropy, 1.0, block_size=BLOCK).fit((x, y))
    blocks = []
    score = im.source.score_block
    im.source.score_block = lambda *args: blocks.append(1) or score(*args)
    both = im.top_k(xt, yt, k=4, with_scores=True)
    assert len(blocks) == -(-N // BLOCK)  # one pass over the training data for both results
    del im.source.score_block
    # The same blocks and the same products: the matrix equals train_influences' bit for bit,
    # and the ranking equals top_k's without the matrix.
    assert torch.equal(both.scores, im.train_influences(xt, yt))
    alone = im.top_k(xt, yt, k=4)
    assert alone.scores is None
    for name in ("helpful_indices", "helpful_values", "harmful_indices", "harmful_values"):
        assert torch.equal(getattr(both, name), getattr(alone, name))
    in_file = im.top_k(xt, yt, k=4, with_scores=True, out=tmp_path / "scores.npy")
    assert torch.equal(in_file.scores, both.scores)
    assert np.array_equal(np.load(tmp_path / "scores.npy"), both.scores.numpy())


def conv_problem():
    """A convolution (its per-sample gradients have two routes, patches or grouped) and a Linear layer."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    x, y = torch.randn(N, 2, 8, 8), torch.randint(0, 3, (N,))
    return model, x, y, x[:N_TEST], y[:N_TEST]


@pytest.mark.parametrize("solver", [tfl.DirectInfluence, tfl.EkfacInfluence, tfl.KfacInfluence])
def test_top_k_with_self_influences_in_the_same_pass(solver):
    """Scores, ranking and self-influences from one pass, equal bit for bit to the separate calls;
    K-FAC and EK-FAC capture each training block once for both (float32 conv net)."""
    model, x, y, xt, yt = conv_problem() if solver is not tfl.DirectInfluence else problem()
    im = solver(model, F.cross_entropy, 1.0, block_size=BLOCK, progress=False).fit((x, y))
    captures = []
    if solver is not tfl.DirectInfluence:
        original = im._capture
        im._capture = lambda *args, **kw: captures.append(1) or original(*args, **kw)
    both = im.top_k(xt, yt, k=4, with_scores=True, with_self_influences=True)
    if solver is not tfl.DirectInfluence:
        # The queries' block, then one capture per training block for scores and self-influences.
        assert len(captures) == 1 + -(-N // BLOCK)
        del im._capture
    assert both.self_influences.shape == (N,)
    assert torch.equal(both.self_influences, im.self_influences(x, y))
    assert torch.equal(both.scores, im.train_influences(xt, yt))
    alone = im.top_k(xt, yt, k=4)
    assert alone.self_influences is None
    for name in ("helpful_indices", "helpful_values", "harmful_indices", "harmful_values"):
        assert torch.equal(getattr(both, name), getattr(alone, name))


def test_top_k_with_scores_refusals(tmp_path):
    model, x, y, xt, yt = problem()
    im = tfl.DirectInfluence(model, F.cross_entropy, 1.0).fit((x, y))
    with pytest.raises(ValueError, match="pass with_scores=True"):
        im.top_k(xt, yt, k=2, out=tmp_path / "s.npy")
    with pytest.raises(ValueError, match="checkpoint= resumes the top-k state alone"):
        im.top_k(xt, yt, k=2, with_scores=True, checkpoint=tmp_path / "t.safetensors")
    with pytest.raises(TypeError, match="with_scores must be a bool"):
        im.top_k(xt, yt, k=2, with_scores=1)
    with pytest.raises(TypeError, match="with_self_influences must be a bool"):
        im.top_k(xt, yt, k=2, with_self_influences="yes")
    with pytest.raises(ValueError, match="drop with_self_influences=True"):
        im.top_k(xt, yt, k=2, with_self_influences=True, checkpoint=tmp_path / "t.safetensors")


def test_scores_from_factors_reads_any_data_source():
    model, x, y, xt, yt = problem()
    im = tfl.CgInfluence(model, F.cross_entropy, 1.0, block_size=BLOCK).fit((x, y))
    factors = im.influence_factors(xt, yt)
    expected = im.influences_from_factors(factors, x, y)
    # Batches of 24 split into other blocks than (x, y) does: per-sample gradients are the
    # same numbers, summed in other groupings, so float64 rounding only.
    loader = DataLoader(TensorDataset(x, y), batch_size=24)
    torch.testing.assert_close(im.scores_from_factors(factors, loader), expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(im.scores_from_factors(factors, (x, y)), expected)


def test_an_interrupted_job_keeps_its_finished_blocks(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a resumable job saves the blocks finished before it, however recently
    the last timed save was; the rerun scores only the rest and gives the same bits."""
    monkeypatch.setattr(journal, "SAVE_TIME_RATIO", 1e9)  # no timed save after the job's first record
    model, x, y, xt, yt = problem()
    im = tfl.DirectInfluence(model, F.cross_entropy, 1.0, block_size=BLOCK).fit((x, y))
    expected = im.influences(xt, yt, x, y)
    calls = []
    score = im.source.score_block

    def interrupted(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return score(*args)

    im.source.score_block = interrupted
    path = tmp_path / "s.npy"
    with pytest.raises(KeyboardInterrupt):
        im.influences(xt, yt, x, y, out=path)
    record = json.loads(journal.sidecar_path(path).read_text())
    assert record["blocks"] == [[0, 3, 0, 3 * BLOCK]] and not record["complete"]
    calls.clear()
    im.source.score_block = lambda *args: calls.append(1) or score(*args)
    assert torch.equal(im.influences(xt, yt, x, y, out=path), expected)
    assert len(calls) == -(-N // BLOCK) - 3
