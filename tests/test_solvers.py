"""Solvers against the exact float64 oracle (explicit Hessian, dense solve) on digits."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch.func import functional_call, jacrev
from torchfluence.reference import select_topk

from .digits import (
    cnn,
    digits,
    exact_hessian,
    exact_influences,
    flat_params,
    loader,
    mlp,
    rel_error,
    train,
)

REG = 0.05
LOSS = F.cross_entropy


@pytest.fixture(scope="module")
def problem():
    x, y, xt, yt = digits(n_train=300, n_test=30)
    model = train(mlp(), x, y)
    h = exact_hessian(model, LOSS, x, y)
    exact = exact_influences(model, LOSS, REG, x, y, xt, yt, curvature=h)
    return model, x, y, xt, yt, h, exact


def exact_ggn(model, x, y):
    """(1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i: cross-entropy's output Hessian in closed form."""
    names, theta = flat_params(model)
    params = dict(model.named_parameters())

    def outputs(t, xi):
        split = dict(zip(names, [v.view_as(params[n]) for n, v in zip(names, t.split([params[n].numel() for n in names]))]))
        return functional_call(model, split, (xi[None],))[0]

    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for xi in x:
        jac = jacrev(outputs)(theta, xi)  # (10, p)
        p = torch.softmax(outputs(theta, xi), dim=0)
        total += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return total / x.shape[0]


def test_direct_matches_exact_to_machine_precision(problem):
    model, x, y, xt, yt, _, exact = problem
    im = tfl.DirectInfluence(model, LOSS, REG, dtype=torch.float64).fit(loader(x, y, 128))  # last batch: 44
    got = im.influences(xt, yt, x, y)
    # Both are dense float64 solves of the same system; the condition number of
    # H + 0.05 I is ~20, so agreement to ~1e-12 is machine precision.
    assert rel_error(got, exact) < 1e-10


def test_direct_float32_default(problem):
    model, x, y, xt, yt, _, exact = problem
    im = tfl.DirectInfluence(copy.deepcopy(model).float(), LOSS, REG).fit(loader(x.float(), y, 100))
    got = im.influences(xt.float(), yt, x.float(), y)
    assert got.dtype == torch.float32
    # float32 gradients and products (u ~ 6e-8) amplified by cond(H + reg I) ~ 1e3.
    assert rel_error(got, exact) < 1e-3


def test_gauss_newton_matches_closed_form(problem):
    model, x, y, xt, yt, _, _ = problem
    ggn = exact_ggn(model, x, y)
    exact = exact_influences(model, LOSS, REG, x, y, xt, yt, curvature=ggn)
    direct = tfl.DirectInfluence(model, LOSS, REG, second_order="gauss_newton", dtype=torch.float64)
    assert rel_error(direct.fit(loader(x, y)).influences(xt, yt, x, y), exact) < 1e-10
    cg = tfl.CgInfluence(model, LOSS, REG, second_order="gauss_newton", dtype=torch.float64, rtol=1e-10)
    assert rel_error(cg.fit(loader(x, y)).influences(xt, yt, x, y), exact) < 1e-7


@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("preconditioner", [None, "jacobi"])
def test_cg_matches_exact_to_its_tolerance(problem, preconditioner, block):
    model, x, y, xt, yt, _, exact = problem
    im = tfl.CgInfluence(model, LOSS, REG, dtype=torch.float64, rtol=1e-9, preconditioner=preconditioner,
                         block=block)
    got = im.fit(loader(x, y, 128)).influences(xt, yt, x, y)
    info = im.last_solve_info
    assert bool(info.converged.all()) and float(info.relative_residuals.max()) <= 1e-9
    assert int(info.iterations.max()) > 1
    # Residual 1e-9 relative, times cond ~1e3, bounds the error of each factor.
    assert rel_error(got, exact) < 1e-5


def test_block_cg_survives_dependent_right_hand_sides(problem):
    model, x, y, xt, yt, h, _ = problem
    im = tfl.CgInfluence(model, LOSS, REG, dtype=torch.float64, rtol=1e-10).fit(loader(x, y))
    g = im.grads(xt[:6], yt[:6])
    # Duplicates, a zero row and a linear combination: the block is rank-deficient from the start.
    b = torch.cat([g, g[:2], torch.zeros(1, g.shape[1], dtype=g.dtype), (g[0] - 3 * g[4])[None]])
    got = im.solve(b)
    expected = torch.linalg.solve(h + REG * torch.eye(h.shape[0], dtype=h.dtype), b.T).T
    info = im.last_solve_info
    assert bool(info.converged.all()) and info.iterations.shape == (b.shape[0],)
    assert int(info.iterations[8]) == 0 and bool((got[8] == 0).all())  # b = 0: x = 0 at once
    # Residual 1e-10 relative times cond(H + reg I) ~ 1e3.
    assert rel_error(got, expected) < 1e-6
    assert rel_error(got[6:8], got[:2]) < 1e-9


def test_block_cg_needs_fewer_iterations_than_independent_cg(problem):
    model, x, y, xt, yt, _, _ = problem
    iterations = {}
    for block in (True, False):
        im = tfl.CgInfluence(model, LOSS, REG, dtype=torch.float64, rtol=1e-8, block=block).fit(loader(x, y))
        im.influence_factors(xt, yt)
        iterations[block] = int(im.last_solve_info.iterations.max())
    # 30 right-hand sides share one Krylov space: it grows 30 directions per iteration instead of 1.
    assert iterations[True] * 3 <= iterations[False], iterations


def test_cg_warns_when_not_converged(problem):
    model, x, y, xt, yt, _, _ = problem
    im = tfl.CgInfluence(model, LOSS, REG, dtype=torch.float64, rtol=1e-12, maxiter=3).fit(loader(x, y))
    with pytest.warns(UserWarning, match="did not converge"):
        im.influence_factors(xt, yt)
    assert int(im.last_solve_info.iterations.max()) == 3


def test_lissa_converges_to_exact_as_iterations_grow(problem):
    model, x, y, xt, yt, h, exact = problem
    largest = float(torch.linalg.eigvalsh(h)[-1]) + REG
    errors = []
    for depth in (10, 100, 1000):
        # One full batch makes the recursion deterministic: a Neumann series whose
        # error shrinks like (1 - (lambda_min + reg) / scale) ** depth.
        im = tfl.LissaInfluence(model, LOSS, REG, dtype=torch.float64, maxiter=depth, scale=1.2 * largest)
        errors.append(rel_error(im.fit(loader(x, y, 300)).influences(xt, yt, x, y), exact))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


def test_lissa_minibatches_and_repetitions(problem):
    model, x, y, xt, yt, h, exact = problem
    largest = float(torch.linalg.eigvalsh(h)[-1]) + REG
    im = tfl.LissaInfluence(model, LOSS, REG, dtype=torch.float64, maxiter=600, scale=2 * largest, repetitions=2)
    torch.manual_seed(1)
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100, shuffle=True)
    # Stochastic minibatch curvature: the estimate is noisy but centred on the answer.
    assert rel_error(im.fit(shuffled).influences(xt, yt, x, y), exact) < 0.2


def test_with_regularization_needs_no_refit(problem):
    model, x, y, xt, yt, h, _ = problem
    im = tfl.DirectInfluence(model, LOSS, REG, dtype=torch.float64).fit(loader(x, y))
    exact = exact_influences(model, LOSS, 0.5, x, y, xt, yt, curvature=h)
    assert rel_error(im.with_regularization(0.5).influences(xt, yt, x, y), exact) < 1e-10


def test_self_influences_and_top_k(problem):
    model, x, y, xt, yt, h, exact = problem
    im = tfl.DirectInfluence(model, LOSS, REG, dtype=torch.float64).fit(loader(x, y))
    sub_x, sub_y = x[:50], y[:50]
    full = exact_influences(model, LOSS, REG, x, y, sub_x, sub_y, x=sub_x, y=sub_y, curvature=h)
    assert rel_error(im.self_influences(sub_x, sub_y), torch.diagonal(full)) < 1e-10
    top = im.top_k(xt, yt, loader(x, y, 64), k=5)
    index = torch.arange(x.shape[0]).expand_as(exact)
    helpful_v, helpful_i = select_topk(exact, index, 5, largest=True)
    harmful_v, harmful_i = select_topk(exact, index, 5, largest=False)
    assert torch.equal(top.helpful_indices, helpful_i) and torch.equal(top.harmful_indices, harmful_i)
    assert torch.allclose(top.helpful_values, helpful_v, rtol=1e-9)
    assert bool((top.helpful_values[:, 0] > 0).all())  # sign: helpful means positive


def test_factors_round_trip_and_symmetric_default(problem):
    model, x, y, xt, yt, _, exact = problem
    im = tfl.DirectInfluence(model, LOSS, REG, dtype=torch.float64).fit(loader(x, y))
    factors = im.influence_factors(xt, yt)
    assert factors.shape == (xt.shape[0], im.num_params)
    assert rel_error(im.influences_from_factors(factors, x, y), exact) < 1e-10
    assert im.influences(xt, yt).shape == (xt.shape[0], xt.shape[0])


def test_perturbation_mode_matches_autograd(problem):
    model, x, y, xt, yt, _, _ = problem
    im = tfl.DirectInfluence(model, LOSS, REG, dtype=torch.float64).fit(loader(x, y))
    factors = im.influence_factors(xt[:3], yt[:3])
    got = im.influences_from_factors(factors, x[:4], y[:4], mode="perturbation")
    assert got.shape == (3, 4, 64)
    params = [p for p in model.parameters()]
    for j in range(4):
        xj = x[j:j + 1].clone().requires_grad_(True)
        grads = torch.autograd.grad(LOSS(model(xj), y[j:j + 1]), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        for i in range(3):
            (expected,) = torch.autograd.grad(flat @ factors[i], xj, retain_graph=True)
            assert torch.allclose(got[i, j], expected[0], rtol=1e-9, atol=1e-12)


def test_cnn_direct_and_cg_agree_with_exact():
    x, y, xt, yt = digits(n_train=200, n_test=10, image=True)
    model = train(cnn(), x, y)
    exact = exact_influences(model, LOSS, REG, x, y, xt, yt)
    direct = tfl.DirectInfluence(model, LOSS, REG, dtype=torch.float64).fit(loader(x, y))
    assert rel_error(direct.influences(xt, yt, x, y), exact) < 1e-10
    cg = tfl.CgInfluence(model, LOSS, REG, dtype=torch.float64, rtol=1e-9).fit(loader(x, y))
    assert rel_error(cg.influences(xt, yt, x, y), exact) < 1e-5


def test_parameter_subset_by_name(problem):
    model, x, y, xt, yt, _, _ = problem
    im = tfl.DirectInfluence(model, LOSS, REG, params=["2.weight", "2.bias"], dtype=torch.float64)
    im.fit(loader(x, y))
    assert im.num_params == 12 * 10 + 10
    # Reference: freeze the first layer and use the full oracle on what is left.
    for p in model[0].parameters():
        p.requires_grad_(False)
    try:
        exact = exact_influences(model, LOSS, REG, x, y, xt, yt)
    finally:
        for p in model[0].parameters():
            p.requires_grad_(True)
    assert rel_error(im.influences(xt, yt, x, y), exact) < 1e-10
