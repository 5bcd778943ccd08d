"""Closed-form linear-head curvature against torch.func, and head mode against the generic path."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch import nn
from torchfluence.head import HeadInfluence
from torchfluence.linear_head import linear_head_hessian, linear_head_hvp

from .conftest import DEVICES
from .digits import digits, loader, rel_error

LOSSES = {
    "cross_entropy": (F.cross_entropy, lambda n, C: torch.randint(0, C, (n,))),
    "mse": (F.mse_loss, lambda n, C: torch.randn(n, C, dtype=torch.float64)),
    "bce_with_logits": (F.binary_cross_entropy_with_logits, lambda n, C: torch.rand(n, C, dtype=torch.float64)),
}


def flat_head_loss(loss, x, y, C, d, with_bias):
    def f(theta):
        weight = theta[:C * d].view(C, d)
        bias = theta[C * d:] if with_bias else None
        return loss(F.linear(x, weight, bias), y)
    return f


def autograd_hvp(f, theta, v):
    """Reverse-over-reverse HVP (forward-over-reverse trips on mse_loss's double backward in some torch releases)."""
    theta = theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    return torch.autograd.grad(g @ v, theta)[0]


def to_matrix(flat, C, d, with_bias):  # (k, C*d [+ C]) -> (k, C, d[+1]), bias last column
    w = flat[:, :C * d].view(-1, C, d)
    return torch.cat([w, flat[:, C * d:].unsqueeze(-1)], dim=-1) if with_bias else w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_head_hvp_and_hessian_match_autograd(device, kind, with_bias):
    n, d, C, k = 37, 9, 5, 3
    loss, make_targets = LOSSES[kind]
    x = torch.randn(n, d, dtype=torch.float64, device=device)
    y = make_targets(n, C).to(device)
    theta = torch.randn(C * d + (C if with_bias else 0), dtype=torch.float64, device=device)
    V = torch.randn(k, theta.numel(), dtype=torch.float64, device=device)
    f = flat_head_loss(loss, x, y, C, d, with_bias)
    expected = torch.stack([autograd_hvp(f, theta, v) for v in V])

    weight = theta[:C * d].view(C, d)
    bias = theta[C * d:] if with_bias else None
    got = linear_head_hvp(x, weight, bias, to_matrix(V, C, d, with_bias), kind)
    # float64 sums of n * C * d terms of order 1: agreement to ~1e-13 relative.
    assert rel_error(got, to_matrix(expected, C, d, with_bias)) < 1e-10

    # The explicit Hessian, in (C, d[+1]) row-major order, against one autograd HVP per column.
    order = to_matrix(torch.arange(theta.numel(), device=device)[None], C, d, with_bias).flatten()
    eye = torch.eye(theta.numel(), dtype=torch.float64, device=device)
    exact = torch.stack([autograd_hvp(f, theta, e) for e in eye])[order][:, order]
    assert rel_error(linear_head_hessian(x, weight, bias, kind), exact) < 1e-10


class FrozenBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Linear(64, 10)
        for p in self.features.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.fixture(scope="module")
def frozen_problem():
    x, y, xt, yt = digits(n_train=120, n_test=9, image=True)
    torch.manual_seed(0)
    model = FrozenBackbone().double().eval()
    opt = torch.optim.Adam(model.fc.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y, xt, yt


@pytest.mark.parametrize("solver, kwargs", [
    (tfl.DirectInfluence, {}),
    (tfl.CgInfluence, {"rtol": 1e-10}),
    (tfl.EkfacInfluence, {"fisher": "exact"}),
    (tfl.ArnoldiInfluence, {"rank": 20}),
])
def test_head_mode_equals_the_generic_path(frozen_problem, tmp_path, solver, kwargs):
    model, x, y, xt, yt = frozen_problem
    generic = solver(model, F.cross_entropy, 0.05, dtype=torch.float64, head=False, **kwargs).fit(loader(x, y, 50))
    head = HeadInfluence(solver, model, F.cross_entropy, 0.05, dtype=torch.float64, batch_size=50,
                         cache_dir=tmp_path, **kwargs).fit(loader(x, y, 50))
    assert isinstance(head, solver)  # head mode is a feature transform in front of the same class
    assert head.features.head_name == "fc" and head.num_params == generic.num_params == 650
    if solver is not tfl.EkfacInfluence:  # K-FAC fits Kronecker factors, not curvature products
        assert isinstance(head.curvature_operator, tfl.LinearHeadCurvature)  # closed-form curvature products
    assert head.features.cache_path.parent == tmp_path
    assert np.load(head.features.cache_path, mmap_mode="r").dtype == np.float64  # the computation dtype
    expected = generic.influences(xt, yt, x, y)
    # Same mathematics; CG stops at rtol 1e-10 and Arnoldi's eigenvectors agree to ~1e-10.
    assert rel_error(head.influences(xt, yt, x, y), expected) < 1e-7
    assert rel_error(head.train_influences(xt, yt), expected) < 1e-7
    assert rel_error(head.self_influences(x[:20], y[:20]), generic.self_influences(x[:20], y[:20])) < 1e-7
    top_head, top_generic = head.top_k(xt, yt, k=5), generic.top_k(xt, yt, loader(x, y, 50), k=5)
    assert torch.equal(top_head.harmful_indices, top_generic.harmful_indices)


def test_head_mode_errors(frozen_problem):
    model, x, y, xt, yt = frozen_problem
    head = HeadInfluence(tfl.CgInfluence, model, F.cross_entropy, 0.05, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode='up' only"):
        head.influences(xt, yt, mode="perturbation")
    unfrozen = copy.deepcopy(model)
    for p in unfrozen.parameters():
        p.requires_grad_(True)
    with pytest.raises(ValueError, match="do not sit in one submodule"):
        HeadInfluence(tfl.CgInfluence, unfrozen, F.cross_entropy, 0.05)
    with pytest.raises(ValueError, match="its output is not the model's output"):
        HeadInfluence(tfl.CgInfluence, unfrozen, F.cross_entropy, 0.05, head="features.0").features(x[:3])
    with pytest.raises(ValueError, match="no submodule named 'classifier'"):
        HeadInfluence(tfl.CgInfluence, model, F.cross_entropy, 0.05, head="classifier")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(LOSSES))
def test_linear_head_kernel_float32_and_strided_features(device, kind):
    from torchfluence.reference import linear_head_hvp_reference

    n, d, C, k = 301, 33, 7, 5
    x = torch.randn(d, n, device=device).T  # non-contiguous rows
    weight, bias = torch.randn(C, d, device=device), torch.randn(C, device=device)
    v = torch.randn(k, C, d + 1, device=device)
    expected = linear_head_hvp_reference(x, weight, bias, v, kind)
    expected_no_bias = linear_head_hvp_reference(x, weight, None, v[..., :d], kind)
    for kernel in (True, False):  # the compiled kernel and the tensor-op closed form
        got = linear_head_hvp(x, weight, bias, v, kind, kernel=kernel)
        # float32 sums of n*d products, divided by n: relative error ~1e-7 * sqrt(n * d); 1e-5 leaves margin.
        assert rel_error(got, expected) < 1e-5
        no_bias = linear_head_hvp(x, weight, None, v[..., :d].contiguous(), kind, kernel=kernel)
        assert rel_error(no_bias, expected_no_bias) < 1e-5


class _Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """layer1 frozen; layer2 (conv, BatchNorm, residual) + pooling + fc trainable: a tail, not one submodule."""

    def __init__(self):
        super().__init__()
        self.layer1, self.layer2, self.fc = _Block(1, 3), _Block(3, 4), nn.Linear(4, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.layer2(self.layer1(x)), 1)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("solver, kwargs", [(tfl.DirectInfluence, {}), (tfl.CgInfluence, {"rtol": 1e-11}),
                                            (tfl.LissaInfluence, {"maxiter": 5, "scale": 20.0})])
def test_a_trainable_tail_runs_in_head_mode(solver, kwargs):
    from torchfluence.backbone import split_trainable_tail

    x, y, xt, yt = digits(n_train=60, n_test=4, image=True)
    torch.manual_seed(0)
    model = SmallResNet().double().eval()
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    backbone, tail = split_trainable_tail(model)
    assert torch.equal(tail(backbone(x)), model(x))
    assert [n for n, _ in tail.named_parameters()] == [n for n, p in model.named_parameters() if p.requires_grad]
    kwargs = dict(second_order="gauss_newton", **kwargs)  # an untrained net: H is indefinite
    generic = solver(model, F.cross_entropy, 0.1, head=False, **kwargs).fit(loader(x, y, 25))
    assert generic.features is None
    head = solver(model, F.cross_entropy, 0.1, **kwargs).fit(loader(x, y, 25))  # automatic: no head= needed
    assert head.features.backbone is not None and head.num_params == generic.num_params
    # The same float64 arithmetic on the same features; CG stops at rtol 1e-11.
    assert rel_error(head.influences(xt, yt, x, y), generic.influences(xt, yt, x, y)) < 1e-9
    if solver is tfl.DirectInfluence:  # perturbation needs the backbone: the full model is kept for it
        got = head.influences(xt[:2], yt[:2], x[:3], y[:3], mode="perturbation")
        assert rel_error(got, generic.influences(xt[:2], yt[:2], x[:3], y[:3], mode="perturbation")) < 1e-9


def test_no_split_without_a_frozen_prefix():
    from torchfluence.backbone import split_trainable_tail

    model = SmallResNet()
    assert split_trainable_tail(model) is None  # everything trainable
    for p in model.fc.parameters():
        p.requires_grad_(False)
    assert split_trainable_tail(model) is None  # the trainable part reads the input itself


def test_a_curvature_operator_can_be_injected(frozen_problem):
    model, x, y, xt, yt = frozen_problem
    closed = tfl.CgInfluence(model, F.cross_entropy, 0.05, rtol=1e-11).fit(loader(x, y, 50))
    autograd = tfl.CgInfluence(model, F.cross_entropy, 0.05, rtol=1e-11, curvature=tfl.AutogradHessian)
    assert isinstance(closed.curvature_operator, tfl.LinearHeadCurvature)
    assert isinstance(autograd.curvature_operator, tfl.AutogradHessian)
    # A linear head's Hessian is its Gauss-Newton matrix: both operators give the same solves.
    assert rel_error(autograd.fit(loader(x, y, 50)).influences(xt, yt), closed.influences(xt, yt)) < 1e-8
    with pytest.raises(TypeError, match="curvature must be a CurvatureOperator subclass"):
        tfl.CgInfluence(model, F.cross_entropy, 0.05, curvature="hessian")


def test_scoring_the_fitted_tensors_reuses_the_cached_features():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 8), nn.Tanh()).requires_grad_(False)
    model = nn.Sequential(backbone, nn.Linear(8, 3)).double()
    x, y = torch.randn(50, 5, dtype=torch.float64), torch.randint(0, 3, (50,))
    inputs_seen = []  # tensors only: the model is also traced (torch.fx) to find the trainable tail
    backbone.register_forward_hook(lambda module, inputs, output: inputs_seen.append(inputs[0]))

    def samples_through_backbone():
        return sum(t.shape[0] for t in inputs_seen if isinstance(t, torch.Tensor))

    im = tfl.DirectInfluence(model, nn.functional.cross_entropy, 0.1).fit(DataLoader(TensorDataset(x, y), batch_size=16))
    assert im.features is not None and samples_through_backbone() == 50 + 1  # + the one-sample loss check
    inputs_seen.clear()
    reused = im.influences(x[:4], y[:4], x, y)
    assert samples_through_backbone() == 4  # the test points only: the 50 training samples come from the cache
    again = im.influences(x[:4], y[:4], x.clone(), y.clone())  # other tensors: through the backbone
    assert samples_through_backbone() == 4 + 4 + 50
    assert torch.allclose(reused, again, rtol=1e-12, atol=1e-15)
