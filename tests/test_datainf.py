"""InverseHarmonicMeanInfluence (DataInf) against its formula built densely by hand."""

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LOSS = F.mse_loss


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 3, generator=g, dtype=torch.float64)
    y = torch.randn(13, 2, generator=g, dtype=torch.float64)
    xt = torch.randn(4, 3, generator=g, dtype=torch.float64)
    yt = torch.randn(4, 2, generator=g, dtype=torch.float64)
    return x, y, xt, yt


def grads_by_hand(model, x, y):
    """Per-sample gradients (n, p) by plain autograd, parameters in model order."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        LOSS(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def dense_datainf(g, blocks, v):
    """Mean over i of (g_iB g_iB^T + lambda_B I)^-1 applied to v per block; blocks = [(cols, lambda)]."""
    out = torch.zeros_like(v)
    for cols, lam in blocks:
        gb = g[:, cols]
        eye = torch.eye(gb.shape[1], dtype=g.dtype)
        m = sum(torch.linalg.inv(torch.outer(gi, gi) + lam * eye) for gi in gb) / g.shape[0]
        out[:, cols] = v[:, cols] @ m.T
    return out


def layer_cols():
    # Linear(3, 4): weight 12 + bias 4 -> columns 0..15; Linear(4, 2): 8 + 2 -> 16..25
    return torch.arange(0, 16), torch.arange(16, 26)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_layer_blocks_with_per_block_regularization_match_dense_formula(data):
    x, y, _, _ = data
    model = mlp()
    reg = {"0": 0.1, "2": 0.7}
    im = tfl.InverseHarmonicMeanInfluence(model, LOSS, reg, block_size=5).fit((x, y))  # blocks 5, 5, 3
    assert im.blocks == {"0": [(0, 16)], "2": [(16, 26)]}
    g = grads_by_hand(model, x, y)
    v = torch.randn(3, 26, dtype=torch.float64)
    first, second = layer_cols()
    expected = dense_datainf(g, [(first, 0.1), (second, 0.7)], v)
    assert rel(im.solve(v), expected) < 1e-10
    # the dict reaches the right block: swapped values give a different answer
    swapped = dense_datainf(g, [(first, 0.7), (second, 0.1)], v)
    assert rel(im.solve(v), swapped) > 1e-3
    # a scalar is used for every block
    im.with_regularization(0.3)
    assert rel(im.solve(v), dense_datainf(g, [(first, 0.3), (second, 0.3)], v)) < 1e-10


def test_full_block_matches_dense_formula(data):
    x, y, _, _ = data
    model = mlp()
    im = tfl.InverseHarmonicMeanInfluence(model, LOSS, 0.2, block_structure="full", block_size=4).fit((x, y))
    assert im.blocks == {"full": [(0, 26)]}
    g = grads_by_hand(model, x, y)
    v = torch.randn(5, 26, dtype=torch.float64)
    assert rel(im.solve(v), dense_datainf(g, [(torch.arange(26), 0.2)], v)) < 1e-10
    # differs from the layer-wise map (the off-diagonal blocks are kept)
    layered = tfl.InverseHarmonicMeanInfluence(model, LOSS, 0.2).fit((x, y))
    assert rel(layered.solve(v), im.solve(v)) > 1e-3


def test_custom_block_structure_and_single_sample_is_exact(data):
    x, y, _, _ = data
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    structure = {"weights": ["0.weight", "2.weight"], "biases": ["0.bias", "2.bias"]}
    im = tfl.InverseHarmonicMeanInfluence(model, LOSS, {"weights": 0.4, "biases": 0.9},
                                          block_structure=structure).fit((x, y))
    assert im.blocks == {"weights": [(0, 12), (16, 24)], "biases": [(12, 16), (24, 26)]}
    g = grads_by_hand(model, x, y)
    v = torch.randn(2, 26, dtype=torch.float64)
    w = torch.cat([torch.arange(0, 12), torch.arange(16, 24)])
    b = torch.cat([torch.arange(12, 16), torch.arange(24, 26)])
    assert rel(im.solve(v), dense_datainf(g, [(w, 0.4), (b, 0.9)], v)) < 1e-10
    # with one training sample the harmonic and arithmetic means agree: the exact damped inverse
    one = tfl.InverseHarmonicMeanInfluence(model, LOSS, 0.5, block_structure="full").fit((x[:1], y[:1]))
    exact = torch.linalg.solve(torch.outer(g[0], g[0]) + 0.5 * torch.eye(26, dtype=torch.float64), v.T).T
    assert rel(one.solve(v), exact) < 1e-12
    assert len(names) == 4


def test_influences_follow_the_solver_convention(data):
    x, y, xt, yt = data
    model = mlp()
    im = tfl.InverseHarmonicMeanInfluence(model, LOSS, 0.05, block_size=4).fit((x, y))
    g_train, g_test = grads_by_hand(model, x, y), grads_by_hand(model, xt, yt)
    got = im.influences(xt, yt, x, y)
    assert got.shape == (4, 13)
    # influences[i, j] = grad L(z_test_i)^T (F + lambda I)^-1 grad L(z_j), as with the other solvers
    assert rel(got, g_test @ im.solve(g_train).T) < 1e-10
    assert rel(got, im.solve(g_test) @ g_train.T) < 1e-10  # the approximation is symmetric
    assert rel(im.influence_factors(xt, yt), im.solve(g_test)) < 1e-12
    assert rel(im.train_influences(xt, yt), got) < 1e-12
    self_inf = im.self_influences(x, y)
    assert rel(self_inf, (g_train * im.solve(g_train)).sum(1)) < 1e-10
    assert bool((self_inf > 0).all())  # positive definite: every point helps itself
    # same sign convention as the exact solver on a model where both are close (large damping)
    direct = tfl.DirectInfluence(model, LOSS, 50.0, dtype=torch.float64).fit((x, y))
    approx = tfl.InverseHarmonicMeanInfluence(model, LOSS, 50.0).fit((x, y))
    a, d = approx.influences(xt, yt, x, y), direct.influences(xt, yt, x, y)
    assert rel(a, d) < 1e-2


def test_large_regularization_approaches_v_over_lambda(data):
    x, y, _, _ = data
    model = mlp()
    v = torch.randn(3, 26, dtype=torch.float64)
    errors = []
    for lam in (1e2, 1e4, 1e6):
        im = tfl.InverseHarmonicMeanInfluence(model, LOSS, lam).fit((x, y))
        errors.append(rel(im.solve(v), v / lam))
    assert errors[-1] < 1e-5
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_regularization_must_be_positive(bad):
    with pytest.raises(ValueError, match="regularization"):
        tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, bad)


def test_bad_block_regularization_and_structure_are_named():
    with pytest.raises(ValueError, match=r"regularization\['2'\]"):
        tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, {"0": 1.0, "2": 0.0})
    with pytest.raises(ValueError, match="missing: \\['2'\\]"):
        tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, {"0": 1.0})
    with pytest.raises(ValueError, match="unknown block names \\['3'\\]"):
        tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, {"0": 1.0, "2": 1.0, "3": 1.0})
    with pytest.raises(ValueError, match="block_structure"):
        tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, 1.0, block_structure="diagonal")
    with pytest.raises(ValueError, match="missing"):
        tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, 1.0, block_structure={"a": ["0.weight"]})
    with pytest.raises(ValueError, match="two blocks"):
        tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, 1.0, block_structure={
            "a": ["0.weight", "0.bias"], "b": ["0.bias", "2.weight", "2.bias"]})
    with pytest.raises(ValueError, match="not a selected parameter"):
        tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, 1.0, block_structure={"a": ["nope"]})
    with pytest.raises(TypeError, match="second_order"):
        tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, 1.0, second_order="hessian")
    im = tfl.InverseHarmonicMeanInfluence(mlp(), LOSS, 1.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        im.solve(torch.zeros(1, 26, dtype=torch.float64))
    with pytest.raises(ValueError, match="regularization"):
        im.with_regularization(-0.5)


def test_loader_and_tensors_agree_and_progress_works(data, capsys):
    x, y, xt, yt = data
    model = mlp()
    a = tfl.InverseHarmonicMeanInfluence(model, LOSS, 0.1).fit((x, y))
    b = tfl.InverseHarmonicMeanInfluence(model, LOSS, 0.1, progress=True, block_size=3).fit(
        DataLoader(TensorDataset(x, y), batch_size=5))
    v = torch.randn(2, 26, dtype=torch.float64)
    assert rel(b.solve(v), a.solve(v)) < 1e-12
    assert rel(b.influences(xt, yt, x, y), a.influences(xt, yt, x, y)) < 1e-12
    assert "DataInf solve" in capsys.readouterr().err
    with pytest.raises(ValueError, match="vectors"):
        a.solve(torch.zeros(2, 25, dtype=torch.float64))
    assert a.solve(torch.zeros(0, 26, dtype=torch.float64)).shape == (0, 26)
    # deterministic
    assert torch.equal(a.solve(v), a.solve(v))


def test_float32_model_runs_in_its_dtype(data):
    x, y, xt, yt = data
    model = mlp().float()
    im = tfl.InverseHarmonicMeanInfluence(model, LOSS, 0.1).fit((x.float(), y.float()))
    ref = tfl.InverseHarmonicMeanInfluence(model, LOSS, 0.1, dtype=torch.float64).fit((x, y))
    got = im.influences(xt.float(), yt.float(), x.float(), y.float())
    assert rel(got.double(), ref.influences(xt, yt, x, y).double()) < 1e-4
