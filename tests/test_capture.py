"""Layer capture: per-sample gradients from activations and output gradients vs torch.func."""

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch import nn
from torchfluence._functional import ModelFunctions
from torchfluence.capture import capture, find_layers

from .conftest import DEVICES


class Sequence(nn.Module):
    """Linear layers applied at every token, then mean-pooled: T > 1 positions."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3, bias=False)

    def forward(self, x):  # (n, T, 5)
        return self.head(torch.tanh(self.embed(x))).mean(dim=1)


class Shared(nn.Module):
    """One Linear called twice: its positions add up."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


def conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), nn.Tanh(),
        nn.Conv2d(3, 4, (2, 3), dilation=(2, 1), padding="same"), nn.Tanh(),
        nn.Conv2d(4, 2, 3, padding="valid"), nn.Flatten(), nn.LazyLinear(5))


def conv1d_net():
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv1d(3, 4, 2, dilation=3, padding="same", bias=False), nn.Tanh(),
        nn.Conv1d(4, 2, 3, padding="valid"), nn.Flatten(), nn.LazyLinear(5))


def conv3d_net():
    return nn.Sequential(
        nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=(1, 1, 0)), nn.Tanh(),
        nn.Conv3d(3, 2, (3, 2, 2), dilation=(1, 2, 1), padding="same", bias=False), nn.Tanh(),
        nn.Flatten(), nn.LazyLinear(4))


CASES = {
    "conv1d": (conv1d_net, (2, 13), 5),
    "conv3d": (conv3d_net, (2, 5, 7, 6), 4),
    "mlp": (lambda: nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 4)), (9,), 4),
    "conv": (conv_net, (2, 9, 11), 5),
    "sequence": (Sequence, (6, 5), 3),
    "shared": (Shared, (6,), 4),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_capture_gives_per_sample_gradients(case, device):
    make, shape, classes = CASES[case]
    model = make().double().to(device)
    x = torch.randn(13, *shape, dtype=torch.float64, device=device)
    model(x)  # materialise lazy layers
    y = torch.randint(0, classes, (13,), device=device)
    functions = ModelFunctions(model.eval(), F.cross_entropy, None, torch.float64)
    layers, missing = find_layers(functions)
    assert missing == []
    got = capture(functions, layers, x, y).per_sample_grads(layers, functions.num_params)
    expected = functions.per_sample_grads(x, y)
    # Same float64 sums in another order: agreement to rounding of O(1) values.
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_registered_layer_type():
    class Affine(nn.Module):
        """out = x W^T, a module type the library does not know."""

        def __init__(self, d_in, d_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)

        def forward(self, x):
            return x @ self.weight.T

    model = nn.Sequential(Affine(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    functions = ModelFunctions(model, F.cross_entropy, None, torch.float64)
    assert [l.name for l in find_layers(functions)[0]] == ["2"]
    tfl.register_layer(Affine, activations=lambda m, x: x.unsqueeze(1), output_grads=lambda m, g: g.unsqueeze(1))
    try:
        layers, missing = find_layers(functions)
        assert [l.name for l in layers] == ["0", "2"] and missing == []
        x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
        got = capture(functions, layers, x, y).per_sample_grads(layers, functions.num_params)
        torch.testing.assert_close(got, functions.per_sample_grads(x, y), rtol=1e-10, atol=1e-12)
    finally:
        from torchfluence.capture import _RULES

        _RULES.pop(Affine)


def test_unsupported_modules_are_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(1, 2, 1, groups=1), nn.Flatten())
    model[2] = nn.Conv2d(2, 2, 1, groups=2)
    functions = ModelFunctions(model, F.mse_loss, ["0.weight", "1.weight", "2.weight"], torch.float32)
    layers, missing = find_layers(functions)
    assert [l.name for l in layers] == ["0"] and layers[0].bias_slice is None  # bias not selected
    assert missing == ["1.weight", "2.weight"]


@pytest.mark.parametrize("conv", [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=2, out_channels=4, kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), bias=False),
    dict(in_channels=2, out_channels=3, kernel_size=(2, 3), dilation=(2, 1), padding="same"),  # uneven padding
    dict(in_channels=4, out_channels=2, kernel_size=1, padding="valid"),
])
def test_conv_per_sample_grads_without_patches_equal_the_float64_patch_product(conv):
    """The grouped convolution backward and sum_t g_t a_t^T over the patches are the same
    float64 sums in other orders: agreement to 1e-12 relative (rounding of ~100-term sums)."""
    from torchfluence.capture import ConvInput, _conv2d_activations

    torch.manual_seed(0)
    module = nn.Conv2d(**conv).double()
    x = torch.randn(6, conv["in_channels"], 9, 10, dtype=torch.float64)
    out = module(x)
    g = torch.randn_like(out).flatten(2).transpose(1, 2)  # (n, T, d_out)
    bias = module.bias is not None
    patches = _conv2d_activations(module, x)
    if bias:
        patches = torch.cat([patches, patches.new_ones(*patches.shape[:-1], 1)], dim=-1)
    expected = torch.einsum("nto,nti->noi", g, patches)
    lazy = ConvInput(module, x, bias)
    torch.testing.assert_close(lazy.grads(g, 0, 6), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lazy.grads(g, 2, 5), expected[2:5], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lazy.patches(), patches, rtol=0, atol=0)
    # The patches themselves against F.unfold's, where it applies (numeric padding).
    if not isinstance(conv.get("padding", 0), str):
        unfolded = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                            stride=module.stride).transpose(1, 2)
        torch.testing.assert_close(_conv2d_activations(module, x), unfolded, rtol=0, atol=0)


def test_scores_and_gradients_of_a_conv_net_agree_on_both_per_sample_gradient_routes():
    """Above GROUPED_GRADS_MIN_POSITIONS the grouped route is taken; forcing the patch route
    must give the same float64 scores and per-sample gradients (rounding only)."""
    from torchfluence import capture as capture_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    x, y = torch.randn(20, 2, 10, 10, dtype=torch.float64), torch.randint(0, 5, (20,))
    runs = []
    for positions in (16, 10**9):  # grouped for both convs (100 and 16 positions) / patches only
        capture_module.GROUPED_GRADS_MIN_POSITIONS = positions
        try:
            im = tfl.EkfacInfluence(model, F.cross_entropy, 0.1, dtype=torch.float64).fit((x, y))
            runs.append((im.influences(x[:4], y[:4], x, y), im.grads(x, y)))
        finally:
            capture_module.GROUPED_GRADS_MIN_POSITIONS = 64
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-10, atol=1e-12)
    exact = torch.func.vmap(torch.func.grad(lambda t, xi, yi: im.functions._sample_loss(t, xi, yi)),
                            in_dims=(None, 0, 0))(im.functions.theta, x, y)
    torch.testing.assert_close(runs[0][1], exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv", [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=(2, 3), dilation=(2, 1), padding="same"),  # uneven padding
    dict(in_channels=2, out_channels=4, kernel_size=(2, 3), stride=(2, 1), padding=(1, 0)),
])
def test_gpu_patch_route_equals_the_cpu_one(conv):
    """GPUs form patches with F.unfold (a transposed view), CPUs with strided copies: the same values."""
    from torchfluence.capture import _conv2d_pads, _strided_patches, _unfold_patches

    module = nn.Conv2d(**conv).double()
    x = F.pad(torch.randn(3, conv["in_channels"], 9, 10, dtype=torch.float64), _conv2d_pads(module))
    view = _unfold_patches(module, x)
    assert not view.is_contiguous()
    torch.testing.assert_close(view, _strided_patches(module, x), rtol=0, atol=0)


def test_a_conv_net_scores_the_same_on_non_contiguous_patches(monkeypatch):
    """Every consumer of the patches takes F.unfold's transposed view (the GPU route): forcing
    it on a CPU, with the grouped gradients and row-shift covariance off, gives the same float64
    factors and scores as the contiguous patches (rounding only)."""
    from torchfluence import capture as capture_module
    from torchfluence import conv_covariance

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    x, y = torch.randn(20, 2, 10, 10, dtype=torch.float64), torch.randint(0, 5, (20,))
    monkeypatch.setattr(capture_module, "GROUPED_GRADS_MIN_POSITIONS", 10**9)
    monkeypatch.setattr(conv_covariance, "applies", lambda *args: False)
    runs = []
    for route in (capture_module._strided_patches, capture_module._unfold_patches):
        monkeypatch.setattr(capture_module, "_strided_patches", route)
        im = tfl.EkfacInfluence(model, F.cross_entropy, 0.1, dtype=torch.float64).fit((x, y))
        runs.append((im.factors["0"].eigenvalues, im.train_influences(x[:4], y[:4]), im.self_influences(x, y)))
    for got, expected in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv, size", [
    (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (9, 10)),
    (dict(in_channels=2, out_channels=4, kernel_size=(3, 2), padding=(2, 0), bias=False), (8, 7)),
    (dict(in_channels=2, out_channels=3, kernel_size=(2, 3), dilation=(3, 1), padding="same"), (12, 9)),
    (dict(in_channels=4, out_channels=2, kernel_size=5, padding="valid"), (13, 11)),
])
def test_conv_patch_covariance_from_row_shifts_equals_the_float64_patch_product(conv, size):
    """The row-shift route sums the same products as P^T P over the patches, regrouped, and
    subtracts boundary rows: float64 agreement to 1e-12 relative (sums of ~1e3 O(1) terms)."""
    from torchfluence import conv_covariance
    from torchfluence.capture import ConvInput, _conv2d_activations, _conv2d_pads

    torch.manual_seed(0)
    module = nn.Conv2d(**conv).double()
    x = torch.randn(5, conv["in_channels"], *size, dtype=torch.float64)
    assert conv_covariance.applies(module, x, _conv2d_pads(module))
    bias = module.bias is not None
    a = _conv2d_activations(module, x).reshape(-1, module.weight[0].numel())
    if bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    got = conv_covariance.patch_covariance(module, x, _conv2d_pads(module), bias)
    torch.testing.assert_close(got, a.T @ a, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ConvInput(module, x, bias).covariance(), a.T @ a, rtol=1e-12, atol=1e-10)


def test_conv_patch_covariance_is_not_taken_where_it_does_not_apply():
    from torchfluence import conv_covariance

    x = torch.randn(2, 3, 16, 16)
    assert not conv_covariance.applies(nn.Conv2d(3, 4, 3, stride=2), x, [0, 0, 0, 0])
    assert not conv_covariance.applies(nn.Conv2d(3, 4, 1), x, [0, 0, 0, 0])
    assert not conv_covariance.applies(nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 4, 4), [1, 1, 1, 1])
