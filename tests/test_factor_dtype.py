"""16-bit factor operands (``factor_dtype``): 16-bit rounding of the operands, float32 sums.

The references are float64 products of the same rounded operands (what a tensor-core
GEMM with float32 accumulation computes, up to float32 summation error) and the float32
fit; the bounds are justified next to each check. On a CPU with bf16 instructions the
factor products also round their results to bf16 (:func:`~torchfluence.precision.factor_matmul`),
which :func:`assert_factor_product` checks element by element.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfluence as tfl
from torchfluence.capture import ConvInput, capture, gram
from torchfluence.precision import NATIVE_BF16_CPU, factor_matmul, matmul_float32, rounds_factor_results

from .conftest import DEVICES
from .digits import cnn, digits, loader, train

BF16 = torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [((40, 30), (30, 20)), ((5, 40, 30), (30, 20)), ((40, 30), (5, 30, 20)),
                                    ((5, 40, 30), (5, 30, 20))], ids=["mm", "batch-left", "batch-right", "bmm"])
def test_matmul_float32_rounds_only_the_operands(device, shapes):
    a = torch.randn(*shapes[0], device=device).to(BF16)
    b = torch.randn(*shapes[1], device=device).to(BF16)
    out = matmul_float32(a, b)
    assert out.dtype == torch.float32 and out.shape == torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (
        a.shape[-2], b.shape[-1])
    exact = a.double() @ b.double()
    # float32 accumulation over 30 terms: ~1e-7 relative; a bf16-rounded result would be ~2e-3 off.
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


def assert_factor_product(got, exact):
    """`got` is the float32 product of rounded operands whose float64 product is `exact`.

    Where results stay float32: float32 sums over at most a few hundred terms, ~sqrt(terms)
    * 6e-8 relative, a few 1e-6 (a bf16-rounded result would be ~2e-3 off). On a CPU's
    native bf16 route, the float32 sum rounded to bf16: every element within bf16's unit
    roundoff (2^-8 relative) of the exact one, plus the float32 sum's error, and
    representable in bf16. Products of unrounded operands miss both bounds (checked by the callers).
    """
    assert got.dtype == torch.float32
    if not rounds_factor_results(got.device, BF16):
        assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-5
        return
    assert torch.equal(got, got.to(BF16).float())
    slack = 2.0 ** -8 * exact.abs() + 1e-6 * exact.abs().max()
    assert ((got.double() - exact).abs() <= slack).all()


@pytest.mark.parametrize("device", DEVICES)
def test_factor_products_round_their_operands(device):
    a = torch.randn(5, 40, 30, device=device)
    b = torch.randn(30, 20, device=device)
    exact = a.to(BF16).double() @ b.to(BF16).double()
    assert_factor_product(factor_matmul(a, b, BF16), exact)
    # The native route is read from the hardware: bf16 on a CPU with bf16 instructions only.
    assert rounds_factor_results(torch.device(device), BF16) == (device == "cpu" and NATIVE_BF16_CPU)
    assert not rounds_factor_results(torch.device(device), torch.float16)
    assert not rounds_factor_results(torch.device(device), None)
    assert torch.equal(factor_matmul(a, b, None), a @ b)


@pytest.mark.parametrize("device", DEVICES)
def test_covariances_are_sums_of_rounded_operands(device):
    a = torch.randn(16, 9, 12, device=device)
    exact = gram(a.to(BF16).double())
    assert_factor_product(gram(a, BF16), exact)
    # n T = 144 terms here, 600 below (assert_factor_product's float32 bound);
    # the float32 covariance of unrounded operands would be ~1e-3 off.
    # A convolution's patch covariance, on the CPU's row-shift route and the patch route alike.
    conv = nn.Conv2d(3, 4, 3, padding=1).to(device)
    x = torch.randn(6, 3, 10, 10, device=device)
    inputs = ConvInput(conv, x, bias=True)
    exact = gram(ConvInput(conv, x.to(BF16).float(), bias=True).patches().double())
    got = inputs.covariance(BF16)
    if device == "cpu":  # the row-shift route rounds the input and sums in float32
        assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-5
    else:
        assert_factor_product(got, exact)
    unrounded = gram(inputs.patches().double())
    assert ((unrounded - exact).norm() / exact.norm()).item() > 1e-4  # the check above can tell them apart


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y, xt, yt = digits(400, 30, dtype=torch.float32, image=True)[:4]
    return train(cnn(torch.float32), x, y, steps=100), x, y, xt, yt


@pytest.mark.parametrize("cls", [tfl.EkfacInfluence, tfl.KfacInfluence])
def test_bfloat16_factors_agree_with_the_float32_fit(trained, cls):
    model, x, y, xt, yt = trained
    make = lambda fd: cls(model, F.cross_entropy, 1e-3, fisher="exact", factor_dtype=fd, progress=False).fit(  # noqa: E731
        loader(x, y, 100))
    full, low = make(None), make(BF16)
    for name, f in full.factors.items():
        g = low.factors[name]
        # Eigenvalues from covariances of bf16-rounded operands (relative rounding up to 2^-8 per
        # operand, averaged over thousands of terms): within 1% of the float32 fit's in norm.
        assert ((g.eigenvalues - f.eigenvalues).norm() / f.eigenvalues.norm()).item() < 1e-2
    a, b = full.influences(xt, yt, x, y), low.influences(xt, yt, x, y)
    # Measured 0.4% on this model; 3% leaves room for other draws of the data, while a
    # wrong product (a transposed factor, a missing rotation) is off by O(1).
    assert ((a - b).norm() / a.norm()).item() < 3e-2
    overlap = [len(set(a[i].topk(10).indices.tolist()) & set(b[i].topk(10).indices.tolist())) for i in range(len(a))]
    assert sum(overlap) / (10 * len(a)) > 0.9


def test_factor_dtype_is_checked_and_saved(trained, tmp_path):
    model, x, y, *_ = trained
    with pytest.raises(ValueError, match="factor_dtype must be None .* got torch.int8"):
        tfl.EkfacInfluence(model, F.cross_entropy, 1e-3, factor_dtype=torch.int8)
    with pytest.raises(ValueError, match="factor_dtype=torch.bfloat16 with dtype=torch.float64"):
        tfl.EkfacInfluence(model, F.cross_entropy, 1e-3, factor_dtype=BF16, dtype=torch.float64)
    im = tfl.EkfacInfluence(model, F.cross_entropy, 1e-3, factor_dtype=BF16, progress=False).fit(loader(x[:64], y[:64]))
    assert im.options().factor_dtype == BF16
    loaded = tfl.EkfacInfluence.load(im.save(tmp_path / "s.safetensors"), model, F.cross_entropy)
    assert loaded.factor_dtype == BF16
    assert torch.equal(loaded.influences(x[:4], y[:4], x[:8], y[:8]), im.influences(x[:4], y[:4], x[:8], y[:8]))


@pytest.mark.parametrize("cls", [tfl.EkfacInfluence, tfl.KfacInfluence])
def test_bfloat16_autocast_captures_agree_with_the_float32_fit(trained, cls):
    """capture_dtype runs the fit's model passes under autocast; the scores stay close to the
    float32 fit's (measured 0.6-0.8% relative error here; 24-27% for a fit on a quarter of the data), and far from a fit on other data."""
    model, x, y, xt, yt = trained
    make = lambda **kw: cls(model, F.cross_entropy, 1e-3, fisher="exact", progress=False, **kw)  # noqa: E731
    full = make().fit(loader(x, y, 100))
    auto = make(capture_dtype=BF16, factor_dtype=BF16).fit(loader(x, y, 100))
    assert all(f.eigenvalues.dtype == torch.float64 for f in auto.factors.values())
    a, b = full.influences(xt, yt, x, y), auto.influences(xt, yt, x, y)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    error = ((a - b).norm() / a.norm()).item()
    other = make().fit(loader(x[:100], y[:100], 100)).influences(xt, yt, x, y)
    assert error < 5e-2 and error < 0.5 * ((a - other).norm() / a.norm()).item()
    overlap = [len(set(a[i].topk(10).indices.tolist()) & set(b[i].topk(10).indices.tolist())) for i in range(len(a))]
    assert sum(overlap) / (10 * len(a)) > 0.85
    with pytest.raises(ValueError, match="capture_dtype must be None"):
        make(capture_dtype=torch.float64)


def test_capture_dtype_autocasts_the_fit_only(trained):
    """capture_dtype runs the fit's passes under autocast; the scored gradients never are.

    The autocast capture is widened to float32 and within bf16's rounding of the plain one
    (bf16 products in the forward and backward: ~1e-2 relative), yet not equal to it, so
    autocast did run. Scores of the autocast fit equal, bit for bit, those of the same
    factors with capture_dtype unset: queries and training data are captured
    without autocast (with it, per-query Spearman fell to 0.11 on this model).
    """
    model, x, y, *_ = trained
    im = tfl.EkfacInfluence(model, F.cross_entropy, 1e-3, capture_dtype=BF16, progress=False)
    plain = capture(im.functions, im.layers, x[:16], y[:16])
    auto = capture(im.functions, im.layers, x[:16], y[:16], autocast_dtype=BF16)
    for p, a in zip(plain.output_grads, auto.output_grads):
        assert a.dtype == torch.float32
        assert 0 < ((a - p).norm() / p.norm()).item() < 5e-2
    im.fit(loader(x, y, 100))
    scores = im.influences(x[:5], y[:5], x, y)
    im.capture_dtype = None  # the same factors, scored by a solver without autocast
    im.forget_queries()
    assert torch.equal(scores, im.influences(x[:5], y[:5], x, y))


def test_autocast_capture_still_checks_the_capture_rules():
    """A weight used outside its module (a functional tie) is refused under autocast too: the rules
    are checked without autocast (under it, its ~1e-2 differences would fail every model's check),
    and a model that passes them is then fitted under autocast."""
    torch.manual_seed(0)

    class FunctionalTie(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            return self.out(h) + h @ self.inp.weight[:3].T

    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    with pytest.raises(ValueError, match=r"'inp' .* differ from autograd on the first sample"):
        tfl.EkfacInfluence(FunctionalTie(), F.cross_entropy, 1e-3, fisher="empirical", capture_dtype=BF16,
                           progress=False).fit((x, y))
    fine = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    scores = tfl.EkfacInfluence(fine, F.cross_entropy, 1e-3, fisher="empirical", capture_dtype=BF16,
                                progress=False).fit((x, y)).influences(x[:2], y[:2], x, y)
    assert torch.isfinite(scores).all()
