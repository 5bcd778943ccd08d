"""Precision policy: 16-bit scoring operands with float32 scores, IEEE float32 whatever the TF32 flags say."""

import pytest
import torch
import torchfluence as tfl
from torch import nn
from torchfluence.checks import FiniteChecks
from torchfluence.precision import matmul_precision, matmul_float32

from .conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mm_float32_keeps_32_bit_results(device, dtype):
    a = torch.randn(70, 300, device=device).to(dtype)
    b = torch.randn(300, 50, device=device).to(dtype)
    out = matmul_float32(a, b)
    assert out.dtype == torch.float32
    # Against the exact product of the same 16-bit operands: only float32 accumulation error
    # (~6e-8 * sqrt(300) relative) remains. A result rounded to 16 bits would be off by ~1e-3.
    exact = a.double() @ b.double()
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_mm_float32_leaves_32_and_64_bit_products_alone(device):
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(9, 8, dtype=dtype, device=device), torch.randn(8, 7, dtype=dtype, device=device)
        assert torch.equal(matmul_float32(a, b), a @ b)


def test_matmul_precision_restores_the_flag_even_after_an_error():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        with pytest.raises(RuntimeError, match="inside"):
            with matmul_precision(False):
                assert not matmul.allow_tf32
                raise RuntimeError("inside")
        assert matmul.allow_tf32
    finally:
        matmul.allow_tf32 = before


def _conv_problem(device):
    from .digits import digits

    x, y, xt, yt = digits(n_train=120, n_test=9, image=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 3 * 3, 10))
    return model.to(device).eval(), x.to(device), y.to(device), xt.to(device), yt.to(device)


def _scores(model, x, y, xt, yt, **kwargs):
    im = tfl.EkfacInfluence(model, nn.functional.cross_entropy, 0.05, fisher="empirical", block_size=50, **kwargs)
    return im.fit((x, y)).train_influences(xt, yt)


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_bfloat16_scoring_matches_float64(device, fused):
    model, x, y, xt, yt = _conv_problem(device)
    exact = _scores(model, x, y, xt, yt, dtype=torch.float64, fused=fused)
    got = _scores(model, x, y, xt, yt, score_dtype=torch.bfloat16, fused=fused)
    assert got.dtype == torch.float32
    # bf16 operands (8 significant bits, unit roundoff 2^-8 ~ 4e-3) on both sides of each
    # product: a few 1e-3 relative error over the matrix, far below 1e-2.
    assert _relative(got, exact) < 1e-2
    ranks = [torch.corrcoef(torch.stack([g.argsort().argsort().double(), e.argsort().argsort().double()]))[0, 1]
             for g, e in zip(got, exact)]
    assert min(ranks) > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_float32_scoring_ignores_the_global_tf32_matmul_flag(device):
    model, x, y, xt, yt = _conv_problem(device)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        cudnn.allow_tf32 = False  # the model's own convolutions in IEEE float32, as the caller chose
        exact = _scores(model, x, y, xt, yt, dtype=torch.float64)
        matmul.allow_tf32 = True
        got = _scores(model, x, y, xt, yt)
        assert matmul.allow_tf32  # the caller's flag is left as it was
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
    # IEEE float32 through fit, eigendecomposition (float64) and scoring: ~1e-6. TF32 would give ~1e-3.
    assert _relative(got, exact) < 5e-5


@pytest.mark.parametrize("device", DEVICES)
def test_factors_made_in_row_blocks_equal_the_full_solve(device):
    model, x, y, xt, yt = _conv_problem(device)
    im = tfl.EkfacInfluence(model, nn.functional.cross_entropy, 0.05, dtype=torch.float64, block_size=4)
    im.fit((x, y))
    streamed = im.train_influences(xt, yt)  # factors made 4 test rows at a time
    full = im.influences_from_factors(im.influence_factors(xt, yt), x, y)
    assert torch.allclose(streamed, full, rtol=1e-12, atol=1e-14)


def test_score_dtype_is_checked():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="score_dtype must be None"):
        tfl.DirectInfluence(model, nn.functional.cross_entropy, 0.1, score_dtype=torch.int8)
    with pytest.raises(ValueError, match="float64"):
        tfl.DirectInfluence(model.double(), nn.functional.cross_entropy, 0.1, score_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="allow_tf32 must be a bool"):
        tfl.DirectInfluence(model, nn.functional.cross_entropy, 0.1, allow_tf32="yes")


@pytest.mark.parametrize("every", [1, 2, 16])
def test_deferred_finite_checks_name_the_first_bad_value(every):
    checks = FiniteChecks("influence scores", sample_dim=1, every=every, defer=True)
    checks.add(torch.ones(4, 10), 0)
    bad = torch.ones(4, 10)
    bad[3, 5] = float("nan")
    bad[3, 7] = float("inf")
    with pytest.raises(ValueError, match=r"2 value\(s\).*query row 3, sample 105"):
        checks.add(bad, 100)
        checks.add(torch.ones(4, 10), 110)
        checks.finish()


def test_deferred_finite_checks_pass_clean_blocks():
    checks = FiniteChecks("x", defer=True, every=3)
    for offset in range(0, 50, 10):
        checks.add(torch.randn(10, 2), offset)
    checks.finish()
