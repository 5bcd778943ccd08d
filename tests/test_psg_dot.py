"""psg_dot against its float64 plain-PyTorch twin, and against torch.func per-sample gradients."""

import pytest
import torch
import torchfluence as tfl
from torchfluence.gradients import CapturedGradients, FuncGradients
from torch import nn
from torchfluence.capture import capture, find_layers
from torchfluence.captured_scores import psg_dot
from torchfluence.reference import psg_dot_reference

from .conftest import DEVICES, dtypes_for

SHAPES = [  # (n_query, n, T, d_in, d_out)
    (5, 37, 1, 13, 7),  # odd sizes, T = 1: a plain Linear layer
    (7, 300, 9, 17, 11),  # conv-like: several positions, more samples than one block
    (1, 1, 1, 1, 1),
    (12, 3, 4, 300, 2),  # a gradient row longer than one packed slice
]


def tolerance(dtype: torch.dtype, scale: float, depth: int) -> float:
    """Rounding of a depth-term dot product at the input precision, relative to the magnitudes summed."""
    eps = {torch.float64: 1e-16, torch.float32: 6e-8, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    # Half inputs are rounded once (eps) and then accumulated in float32; the sums grow like sqrt(depth).
    return 8 * eps * scale * depth ** 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_queries_match_reference(device, shape):
    n_query, n, T, d_in, d_out = shape
    for dtype in dtypes_for(device):
        Q = torch.randn(n_query, d_out, d_in, device=device).to(dtype)
        A = torch.randn(n, T, d_in, device=device).to(dtype)
        D = torch.randn(n, T, d_out, device=device).to(dtype)
        got = psg_dot(Q, A, D)
        expected = psg_dot_reference(Q, A, D)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # Each score sums d_out * d_in * T products of unit-variance terms.
        scale = float(Q.double().abs().max() * A.double().abs().max() * D.double().abs().max())
        err = float((got.double() - expected).abs().max())
        assert err <= tolerance(dtype, scale, d_out * d_in * T), (dtype, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_for_every_T(device, shape):
    """The compiled kernel itself (psg_dot sends T > 1 to batched matmuls, but the kernel handles any T)."""
    from torchfluence.ops import accumulation_dtype, psg_dot_accumulate

    n_query, n, T, d_in, d_out = shape
    for dtype in dtypes_for(device):
        Q = torch.randn(n_query, d_out * d_in, device=device).to(dtype)
        A = torch.randn(n, T, d_in, device=device).to(dtype)
        D = torch.randn(n, T, d_out, device=device).to(dtype)
        out = torch.zeros(n_query, n, dtype=accumulation_dtype(dtype), device=device)
        psg_dot_accumulate(Q, A, D, out)
        expected = psg_dot_reference(Q.view(n_query, d_out, d_in), A, D)
        scale = float(Q.double().abs().max() * A.double().abs().max() * D.double().abs().max())
        assert float((out.double() - expected).abs().max()) <= tolerance(dtype, scale, d_out * d_in * T)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_accumulation(device):
    Q = torch.randn(6, 9, 11, dtype=torch.float64, device=device).transpose(1, 2).contiguous().transpose(1, 2)
    A = torch.randn(3, 40, 11, dtype=torch.float64, device=device).transpose(0, 1)  # (40, 3, 11), non-contiguous
    D = torch.randn(40, 9, 3, dtype=torch.float64, device=device).transpose(1, 2)  # (40, 3, 9), stride_d != 1
    start = torch.randn(6, 40, dtype=torch.float64, device=device)
    out = start.clone()
    assert psg_dot(Q, A, D, out=out) is out
    assert torch.allclose(out, start + psg_dot_reference(Q, A, D), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T, rank", [(1, 3), (5, 1), (5, 6)])  # (5, 6): cheaper to form U V^T first
def test_low_rank_queries_match_reference(device, T, rank):
    n_query, n, d_in, d_out = 4, 50, 12, 8
    U = torch.randn(n_query, d_out, rank, dtype=torch.float64, device=device)
    V = torch.randn(n_query, d_in, rank, dtype=torch.float64, device=device)
    A = torch.randn(n, T, d_in, dtype=torch.float64, device=device)
    D = torch.randn(n, T, d_out, dtype=torch.float64, device=device)
    expected = psg_dot_reference(U @ V.transpose(1, 2), A, D)
    assert torch.allclose(psg_dot((U, V), A, D), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_scores_equal_per_sample_gradient_products_of_a_conv_net(device):
    """Captured Conv2d/Linear layers scored with psg_dot equal queries . torch.func per-sample gradients."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    model = model.double().to(device).eval()
    x = torch.randn(23, 2, 5, 5, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (23,), device=device)
    im = tfl.CgInfluence(model, nn.functional.cross_entropy, 0.1, dtype=torch.float64)
    grads = im.grads(x, y)  # (n, p) by torch.func
    queries = torch.randn(5, im.num_params, dtype=torch.float64, device=device)
    layers, missing = find_layers(im.functions)
    assert not missing
    captured = capture(im.functions, layers, x, y)
    scores = torch.zeros(5, 23, dtype=torch.float64, device=device)
    for layer, A, D in zip(layers, captured.activations, captured.output_grads):
        psg_dot(layer.matrices(queries), A, D, out=scores)
    assert torch.allclose(scores, queries @ grads.T, rtol=1e-10, atol=1e-12)


def test_bad_input_is_a_clear_error():
    A, D = torch.randn(4, 2, 5), torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match=r"queries must have shape \(n_query, d_out, d_in\) = \(n_query, 3, 5\)"):
        psg_dot(torch.randn(2, 5, 3), A, D)
    with pytest.raises(ValueError, match="must agree in n and T"):
        psg_dot(torch.randn(2, 3, 5), A, D[:, :1])
    with pytest.raises(ValueError, match="must share dtype and device"):
        psg_dot(torch.randn(2, 3, 5, dtype=torch.float64), A, D)
    with pytest.raises(TypeError, match="must have dtype in"):
        psg_dot(torch.randn(2, 3, 5).half(), A.half(), D.half())
    with pytest.raises(ValueError, match=r"U and V must have shapes"):
        psg_dot((torch.randn(2, 3, 4), torch.randn(2, 4, 4)), A, D)
    with pytest.raises(ValueError, match=r"out must be a \(2, 4\) torch.float32 tensor"):
        psg_dot(torch.randn(2, 3, 5), A, D, out=torch.zeros(2, 5))


class MixedNet(nn.Module):
    """A conv layer, a LayerNorm (not capturable: scored through torch.func) and a shared Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        h = self.norm(torch.tanh(self.conv(x)).flatten(1)[:, :48])
        return self.head(h)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_scores_equal_with_and_without_the_fused_path(device):
    from .digits import digits, loader

    x, y, xt, yt = digits(n_train=90, n_test=7, image=True)
    x, y, xt, yt = x.to(device), y.to(device), xt.to(device), yt.to(device)
    torch.manual_seed(0)
    model = MixedNet().double().to(device).eval()
    runs, grads = {}, {}
    for fused in (True, False):
        im = tfl.DirectInfluence(model, nn.functional.cross_entropy, 0.1, dtype=torch.float64, block_size=32,
                                 second_order="gauss_newton",  # an untrained net: H is indefinite
                                 fused=fused).fit(loader(x, y, 45))
        assert isinstance(im.source, CapturedGradients if fused else FuncGradients)
        runs[fused] = (im.influences(xt, yt, x, y), im.top_k(xt, yt, loader(x, y, 45), k=5))
        grads[fused] = im.grads(x, y)  # captured layers by g a^T, the LayerNorm by torch.func (or all by vmap)
    assert torch.allclose(grads[True], grads[False], rtol=1e-10, atol=1e-13)
    (fused_scores, fused_top), (plain_scores, plain_top) = runs[True], runs[False]
    assert torch.allclose(fused_scores, plain_scores, rtol=1e-10, atol=1e-12)
    assert torch.equal(fused_top.helpful_indices, plain_top.helpful_indices)
    assert torch.equal(fused_top.harmful_indices, plain_top.harmful_indices)
    assert torch.allclose(fused_top.helpful_values, plain_top.helpful_values, rtol=1e-10, atol=1e-12)
    factors = im.influence_factors(xt, yt)
    scores = im.influences_from_factors(factors, x[:10], y[:10])
    assert torch.allclose(scores, plain_scores[:, :10], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 6])
def test_self_dot_matches_reference(device, T):
    from torchfluence.captured_scores import psg_self_dot

    W = torch.rand(7, 5, dtype=torch.float64, device=device)
    A = torch.randn(40, T, 5, dtype=torch.float64, device=device)
    D = torch.randn(40, T, 7, dtype=torch.float64, device=device)
    grads = torch.einsum("nto,nti->noi", D, A)
    assert torch.allclose(psg_self_dot(W, A, D), (grads.square() * W).sum(dim=(1, 2)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", [tfl.KfacInfluence, tfl.EkfacInfluence])
def test_kfac_self_influences_fused_equal_plain(device, solver):
    from .digits import digits, loader

    x, y, _, _ = digits(n_train=80, n_test=1, image=True)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(192, 10))
    model = model.double().to(device).eval()
    runs = [solver(model, nn.functional.cross_entropy, 0.1, dtype=torch.float64, fused=fused, block_size=32)
            .fit(loader(x, y, 40)).self_influences(x, y) for fused in (True, False)]
    assert torch.allclose(runs[0], runs[1], rtol=1e-10, atol=0)
