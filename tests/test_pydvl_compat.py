"""torchfluence.pydvl: pyDVL-style constructors and enums on torchfluence's solvers.

Sign convention (torchfluence's and pyDVL's): for mode "up",
influences[i, j] = grad L(z_test_i)^T (H + lambda I)^-1 grad L(z_j), with no minus sign.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchfluence as tf
from torchfluence.pydvl import (ArnoldiInfluence, BlockMode, CgInfluence, DirectInfluence, EkfacInfluence,
                                EmpiricalFisher, InfluenceMode, JacobiPreconditioner, LissaInfluence,
                                NystroemPreconditioner, NystroemSketchInfluence, SecondOrderMode)

LAMBDA = 0.1


@pytest.fixture(scope="module")
def classification():
    """Multinomial logistic regression (convex, so H is positive semi-definite), float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return model, x, y, loader


@pytest.fixture(scope="module")
def regression():
    """Linear regression with MSE, float64."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(30, 1, generator=g,
                                                                                           dtype=torch.float64)
    torch.manual_seed(1)
    model = nn.Linear(3, 1).double().eval()
    return model, x, y, DataLoader(TensorDataset(x, y), batch_size=8)


def _by_hand(model, x, y):
    """Per-sample gradients and the Hessian of the mean squared error, in closed form.

    With z_i = [x_i, 1] and theta = [weight, bias] (the parameter order of nn.Linear),
    L = (1/n) sum_i (z_i . theta - y_i)^2, so g_i = 2 (z_i . theta - y_i) z_i and
    H = (2/n) Z^T Z.
    """
    z = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    residual = z @ theta - y[:, 0]
    grads = 2 * residual[:, None] * z
    hessian = 2 * z.T @ z / x.shape[0]
    return grads, hessian


def _close(a, b, rtol):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


# -- analytical checks --------------------------------------------------------------------------------
def test_direct_hessian_matches_closed_form(regression):
    model, x, y, loader = regression
    grads, hessian = _by_hand(model, x, y)
    expected = grads[:5] @ torch.linalg.solve(hessian + LAMBDA * torch.eye(4, dtype=torch.float64), grads.T)
    influence = DirectInfluence(model, F.mse_loss, regularization=LAMBDA).fit(loader)
    _close(influence.curvature, hessian, 1e-12)
    _close(influence.influences(x[:5], y[:5], x, y, mode="up"), expected, 1e-10)


def test_gauss_newton_mode_is_the_empirical_fisher(regression):
    model, x, y, loader = regression
    grads, hessian = _by_hand(model, x, y)
    fisher = grads.T @ grads / x.shape[0]  # (1/n) sum_i g_i g_i^T
    assert not torch.allclose(fisher, hessian)  # differs from the Hessian (and from the GGN, which equals it here)
    influence = DirectInfluence(model, F.mse_loss, LAMBDA, second_order_mode=SecondOrderMode.GAUSS_NEWTON)
    influence.fit(loader)
    _close(influence.curvature, fisher, 1e-12)
    expected = grads[:5] @ torch.linalg.solve(fisher + LAMBDA * torch.eye(4, dtype=torch.float64), grads.T)
    _close(influence.influences(x[:5], y[:5], x, y), expected, 1e-10)
    cg = CgInfluence(model, F.mse_loss, LAMBDA, rtol=1e-12, atol=0.0, second_order_mode="gauss_newton").fit(loader)
    _close(cg.influences(x[:5], y[:5], x, y), expected, 1e-8)
    assert isinstance(cg.curvature_operator, EmpiricalFisher)


# -- each class equals the native solver ---------------------------------------------------------------
def test_direct_equals_native(classification):
    model, x, y, loader = classification
    compat = DirectInfluence(model, F.cross_entropy, LAMBDA, block_structure=BlockMode.FULL,
                             second_order_mode=SecondOrderMode.HESSIAN).fit(loader)
    native = tf.DirectInfluence(model, F.cross_entropy, LAMBDA).fit(loader)
    _close(compat.influences(x[:6], y[:6], x, y), native.influences(x[:6], y[:6], x, y), 1e-12)


@pytest.mark.parametrize("simultaneously", [False, True])
def test_cg_matches_native_and_direct(classification, simultaneously):
    model, x, y, loader = classification
    direct = tf.DirectInfluence(model, F.cross_entropy, LAMBDA).fit(loader).influences(x[:6], y[:6], x, y)
    compat = CgInfluence(model, F.cross_entropy, regularization=LAMBDA, rtol=1e-10, atol=0.0, maxiter=200,
                         progress=False, solve_simultaneously=simultaneously, block_structure="full").fit(loader)
    native = tf.CgInfluence(model, F.cross_entropy, LAMBDA, rtol=1e-10, maxiter=200, block=simultaneously)
    native.fit(loader)
    result = compat.influences(x[:6], y[:6], x, y)
    assert compat.block is simultaneously and compat.solve_simultaneously is simultaneously
    _close(result, native.influences(x[:6], y[:6], x, y), 1e-12)
    _close(result, direct, 1e-8)
    # pyDVL's default tolerances still agree with the exact solve to about rtol.
    default = CgInfluence(model, F.cross_entropy, LAMBDA, solve_simultaneously=simultaneously).fit(loader)
    _close(default.influences(x[:6], y[:6], x, y), direct, 1e-3)


def test_cg_atol_bounds_every_residual(classification):
    model, x, y, loader = classification
    direct = tf.DirectInfluence(model, F.cross_entropy, LAMBDA).fit(loader)
    a = direct.curvature + LAMBDA * torch.eye(direct.num_params, dtype=torch.float64)
    b = torch.randn(6, direct.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b[:2] *= 1e-4  # small right-hand sides, where atol and not rtol decides
    b[2] *= 1e-11  # below atol**2: x = 0 is already accurate enough
    rtol, atol = 1e-3, 1e-4
    for block in (False, True):
        cg = CgInfluence(model, F.cross_entropy, LAMBDA, rtol=rtol, atol=atol, solve_simultaneously=block).fit(loader)
        solved = cg.solve(b)
        residual = (b - solved @ a).norm(dim=1)
        # pyDVL's code: the squares of rtol and atol (its documentation says rtol and atol).
        bound = torch.clamp(rtol ** 2 * b.norm(dim=1), min=atol ** 2)
        assert bool((residual <= bound * (1 + 1e-9)).all())
        assert cg.rtol == rtol  # restored after the grouped solves
        assert bool((solved[2] == 0).all())


@pytest.mark.parametrize("preconditioner, expected", [
    (JacobiPreconditioner(num_samples_estimator=8), {"preconditioner": "jacobi", "preconditioner_samples": 8}),
    (NystroemPreconditioner(rank=5), {"preconditioner": "nystroem", "preconditioner_rank": 5}),
])
def test_cg_preconditioners(classification, preconditioner, expected):
    model, x, y, loader = classification
    compat = CgInfluence(model, F.cross_entropy, LAMBDA, rtol=1e-10, atol=0.0, preconditioner=preconditioner)
    for name, value in expected.items():
        assert getattr(compat, name) == value
    compat.fit(loader)
    native = tf.CgInfluence(model, F.cross_entropy, LAMBDA, rtol=1e-10, maxiter=10 * compat.num_params,
                            block=False, **expected).fit(loader)
    _close(compat.influences(x[:4], y[:4], x, y), native.influences(x[:4], y[:4], x, y), 1e-12)


def test_cg_older_argument_names(classification):
    model, x, y, loader = classification
    old = CgInfluence(model, F.cross_entropy, hessian_regularization=LAMBDA, use_block_cg=True,
                      pre_conditioner=JacobiPreconditioner(), progress=True)
    assert old.regularization == LAMBDA and old.block and old.preconditioner == "jacobi"
    with pytest.raises(TypeError, match="hessian_regularization"):
        CgInfluence(model, F.cross_entropy, LAMBDA, hessian_regularization=LAMBDA)
    with pytest.raises(TypeError, match="use_block_cg"):
        CgInfluence(model, F.cross_entropy, solve_simultaneously=True, use_block_cg=True)


def test_cg_warn_on_max_iteration(classification):
    model, x, y, loader = classification
    with pytest.warns(UserWarning, match="did not converge"):
        CgInfluence(model, F.cross_entropy, LAMBDA, maxiter=1, atol=0.0).fit(loader).influence_factors(x[:3], y[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CgInfluence(model, F.cross_entropy, LAMBDA, maxiter=1, atol=0.0,
                    warn_on_max_iteration=False).fit(loader).influence_factors(x[:3], y[:3])


def test_lissa_equals_native_and_stops_early(classification):
    model, x, y, loader = classification
    kwargs = dict(maxiter=60, dampen=0.01, scale=20.0)
    compat = LissaInfluence(model, F.cross_entropy, LAMBDA, rtol=0.0, warn_on_max_iteration=False, **kwargs)
    native = tf.LissaInfluence(model, F.cross_entropy, LAMBDA, **kwargs)
    _close(compat.fit(loader).influences(x[:4], y[:4], x, y), native.fit(loader).influences(x[:4], y[:4], x, y),
           1e-12)
    assert compat.last_iterations == 60
    early = LissaInfluence(model, F.cross_entropy, LAMBDA, rtol=0.5, **kwargs).fit(loader)
    early.influence_factors(x[:2], y[:2])
    assert early.last_iterations < 60
    with pytest.warns(UserWarning, match="rtol"):
        LissaInfluence(model, F.cross_entropy, LAMBDA, maxiter=2, rtol=1e-12).fit(loader).influence_factors(x[:2],
                                                                                                           y[:2])


@pytest.mark.parametrize("use_woodbury", [False, True])
def test_arnoldi_equals_native(classification, use_woodbury):
    model, x, y, loader = classification
    compat = ArnoldiInfluence(model, F.cross_entropy, LAMBDA, rank=6, krylov_dimension=15, tol=1e-8,
                              use_woodbury=use_woodbury, eigen_computation_on_gpu=False).fit(loader)
    complement = "regularization" if use_woodbury else "drop"
    native = tf.ArnoldiInfluence(model, F.cross_entropy, LAMBDA, 6, krylov_dimension=15, tol=1e-8,
                                 complement=complement).fit(loader)
    assert compat.complement == complement
    _close(compat.influences(x[:4], y[:4], x, y), native.influences(x[:4], y[:4], x, y), 1e-12)
    # With the full rank both are exact.
    full = ArnoldiInfluence(model, F.cross_entropy, LAMBDA, rank=15, use_woodbury=use_woodbury).fit(loader)
    direct = tf.DirectInfluence(model, F.cross_entropy, LAMBDA).fit(loader)
    _close(full.influences(x[:4], y[:4], x, y), direct.influences(x[:4], y[:4], x, y), 1e-8)


def test_nystroem_equals_native(classification):
    model, x, y, loader = classification
    compat = NystroemSketchInfluence(model, F.cross_entropy, LAMBDA, 8).fit(loader)
    native = tf.NystroemSketchInfluence(model, F.cross_entropy, LAMBDA, 8).fit(loader)
    _close(compat.influences(x[:4], y[:4], x, y), native.influences(x[:4], y[:4], x, y), 1e-12)


@pytest.mark.parametrize("update_diagonal, native_cls", [(False, tf.KfacInfluence), (True, tf.EkfacInfluence)])
def test_ekfac_equals_native(classification, update_diagonal, native_cls):
    model, x, y, loader = classification
    compat = EkfacInfluence(model, update_diagonal=update_diagonal, hessian_regularization=LAMBDA).fit(loader)
    native = native_cls(model, F.cross_entropy, LAMBDA, fisher="exact").fit(loader)
    assert compat.hessian_regularization == LAMBDA and compat.eigenvalue_correction is update_diagonal
    _close(compat.influences(x[:4], y[:4], x, y), native.influences(x[:4], y[:4], x, y), 1e-12)


# -- interface ---------------------------------------------------------------------------------------
def test_mode_enum_and_strings_agree(classification):
    model, x, y, loader = classification
    influence = DirectInfluence(model, F.cross_entropy, LAMBDA)
    assert not influence.is_fitted
    influence = influence.fit(loader)
    assert influence.is_fitted and influence.n_parameters == 15 and influence.is_thread_safe is False
    assert influence.model is model and influence.loss is F.cross_entropy
    up = influence.influences(x[:3], y[:3], x[:7], y[:7], mode=InfluenceMode.Up)
    torch.testing.assert_close(influence.influences(x[:3], y[:3], x[:7], y[:7], mode="up"), up)
    torch.testing.assert_close(influence.influences(x[:3], y[:3], x[:7], y[:7]), up)
    factors = influence.influence_factors(x[:3], y[:3])
    torch.testing.assert_close(influence.influences_from_factors(factors, x[:7], y[:7], mode=InfluenceMode.Up), up)
    perturbation = influence.influences(x[:3], y[:3], x[:7], y[:7], mode=InfluenceMode.Perturbation)
    assert perturbation.shape == (3, 7, 4)
    torch.testing.assert_close(influence.influences(x[:3], y[:3], x[:7], y[:7], mode="perturbation"), perturbation)
    torch.testing.assert_close(
        influence.influences_from_factors(factors, x[:7], y[:7], mode="perturbation"), perturbation)
    with pytest.raises(ValueError, match="mode"):
        influence.influences(x[:3], y[:3], mode="sideways")


def test_with_regularization(classification):
    model, x, y, loader = classification
    cg = CgInfluence(model, F.cross_entropy, LAMBDA, rtol=1e-10, atol=0.0).fit(loader)
    assert cg.with_regularization(0.5) is cg
    direct = DirectInfluence(model, F.cross_entropy, 0.5).fit(loader)
    _close(cg.influences(x[:3], y[:3], x, y), direct.influences(x[:3], y[:3], x, y), 1e-8)
    assert DirectInfluence(model, F.cross_entropy).regularization == 0.0  # None means no regularization


def _unsupported_cases():
    loss = F.cross_entropy
    return [
        (lambda m: ArnoldiInfluence(m, loss, {"nope": LAMBDA}, block_structure="parameter_wise", rank=2),
         ValueError, "regularization: unknown block names"),
        (lambda m: LissaInfluence(m, loss, LAMBDA, block_structure=BlockMode.LAYER_WISE), ValueError,
         "no trainable parameters in any block"),  # nn.Linear has no child modules
        (lambda m: NystroemSketchInfluence(m, loss, LAMBDA, 3, block_structure="diagonal"), ValueError,
         "block_structure"),
        (lambda m: DirectInfluence(m, loss, {"weight": LAMBDA}), ValueError, "regularization: unknown block names"),
        (lambda m: DirectInfluence(m, loss, second_order_mode="fisher"), ValueError, "second_order_mode"),
        (lambda m: ArnoldiInfluence(m, loss, LAMBDA, rank=3, max_iter=100), NotImplementedError, "max_iter"),
        (lambda m: ArnoldiInfluence(m, loss, 0.0, rank=3, use_woodbury=True), ValueError, "use_woodbury"),
        (lambda m: CgInfluence(m, loss, LAMBDA, preconditioner=object()), NotImplementedError, "preconditioner"),
        (lambda m: CgInfluence(m, loss, LAMBDA, atol=-1.0), ValueError, "atol"),
        (lambda m: LissaInfluence(m, loss, LAMBDA, rtol=-1.0), ValueError, "rtol"),
        (lambda m: CgInfluence(m, loss, LAMBDA, precompute_grad="yes"), TypeError, "precompute_grad"),
        (lambda m: JacobiPreconditioner(num_samples_estimator=0), ValueError, "num_samples_estimator"),
        (lambda m: NystroemPreconditioner(rank=0), ValueError, "rank"),
    ]


@pytest.mark.parametrize("case", range(len(_unsupported_cases())))
def test_unsupported_arguments_raise_naming_them(classification, case):
    model = classification[0]
    build, error, name = _unsupported_cases()[case]
    with pytest.raises(error, match=name):
        build(model)


def test_foreign_enum_members_by_value(classification):
    """Members of another module's enums (such as pyDVL's own) are read by their value."""
    import enum

    class OtherBlockMode(enum.Enum):
        FULL = "full"

    class OtherSecondOrder(enum.Enum):
        GAUSS_NEWTON = "gauss_newton"

    class OtherMode(str, enum.Enum):
        Up = "up"

    model, x, y, loader = classification
    influence = DirectInfluence(model, F.cross_entropy, LAMBDA, block_structure=OtherBlockMode.FULL,
                                second_order_mode=OtherSecondOrder.GAUSS_NEWTON).fit(loader)
    assert isinstance(influence.curvature_operator, EmpiricalFisher)
    torch.testing.assert_close(influence.influences(x[:2], y[:2], mode=OtherMode.Up),
                               influence.influences(x[:2], y[:2], mode="up"))


# -- block-diagonal curvature ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    """A 2-layer tanh MLP with cross-entropy, float64 (its Hessian is indefinite, so lambda matters)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (24,), generator=g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    return model, x, y, DataLoader(TensorDataset(x, y), batch_size=10)


def _full_hessian(model, x, y):
    """Hessian of the mean training loss over all parameters (named_parameters order), and their names/sizes."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(flat):
        ps = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    return torch.autograd.functional.hessian(loss, theta), names, sizes


def _per_sample_grads(model, x, y):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(xi, yi):
        grads = torch.func.grad(lambda ps: F.cross_entropy(torch.func.functional_call(model, ps, (xi[None],)),
                                                           yi[None]))(params)
        return torch.cat([g.reshape(-1) for g in grads.values()])

    return torch.vmap(one)(x, y)


def _block_diagonal_influences(model, x, y, x_test, y_test, blocks, lambdas):
    """g_test^T (blockdiag(H) + diag(lambda_B))^-1 g by hand; blocks: {name: [params]}, in parameter order."""
    hessian, names, sizes = _full_hessian(model, x, y)
    offsets = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist()))
    index = {}
    for block, params in blocks.items():
        index[block] = torch.cat([torch.arange(offsets[n], offsets[n] + s) for n, s in zip(names, sizes)
                                  if n in params])
    keep = torch.cat(list(index.values()))
    matrix = torch.zeros_like(hessian)
    for block, idx in index.items():
        matrix[idx[:, None], idx[None, :]] = hessian[idx[:, None], idx[None, :]]
        matrix[idx, idx] += lambdas[block]
    matrix = matrix[keep][:, keep]
    g_test = _per_sample_grads(model, x_test, y_test)[:, keep]
    g = _per_sample_grads(model, x, y)[:, keep]
    return g_test @ torch.linalg.solve(matrix, g.T), hessian


LAYERS = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
LAYER_LAMBDAS = {"0": 0.6, "2": 0.05}


def test_layer_wise_direct_equals_hand_built_block_diagonal_hessian(mlp):
    model, x, y, loader = mlp
    influence = DirectInfluence(model, F.cross_entropy, LAYER_LAMBDAS, block_structure=BlockMode.LAYER_WISE).fit(loader)
    assert influence.block_names == ["0", "2"] and influence.blocks == LAYERS
    assert influence.n_parameters == sum(p.numel() for p in model.parameters())
    expected, hessian = _block_diagonal_influences(model, x, y, x[:5], y[:5], LAYERS, LAYER_LAMBDAS)
    _close(influence.influences(x[:5], y[:5], x, y), expected, 1e-10)
    # The curvature is the Hessian with the cross-layer blocks zeroed.
    p0 = 3 * 4 + 4
    mask = torch.zeros_like(hessian, dtype=torch.bool)
    mask[:p0, :p0] = mask[p0:, p0:] = True
    _close(influence.curvature, torch.where(mask, hessian, torch.zeros_like(hessian)), 1e-10)
    # Factors are flat in the model's parameter order and feed influences_from_factors.
    factors = influence.influence_factors(x[:5], y[:5])
    assert factors.shape == (5, influence.n_parameters)
    _close(influence.influences_from_factors(factors, x, y), expected, 1e-10)
    # The full Hessian needs more regularization here: the blocks really are solved apart.
    full = DirectInfluence(model, F.cross_entropy, 0.6).fit(loader)
    assert (full.influences(x[:5], y[:5], x, y) - expected).abs().max() > 1e-3


def test_parameter_wise_direct_equals_hand_built_per_tensor_blocks(mlp):
    model, x, y, loader = mlp
    lambdas = {"0.weight": 0.6, "0.bias": 0.3, "2.weight": 0.1, "2.bias": 0.2}
    influence = DirectInfluence(model, F.cross_entropy, lambdas, block_structure=BlockMode.PARAMETER_WISE).fit(loader)
    assert influence.block_names == list(lambdas)
    blocks = {n: [n] for n in lambdas}
    expected, _ = _block_diagonal_influences(model, x, y, x[:4], y[:4], blocks, lambdas)
    _close(influence.influences(x[:4], y[:4], x, y), expected, 1e-10)


def test_full_block_mode_is_unchanged(mlp):
    model, x, y, loader = mlp
    compat = DirectInfluence(model, F.cross_entropy, 0.6, block_structure=BlockMode.FULL).fit(loader)
    named = DirectInfluence(model, F.cross_entropy, {"": 0.6}).fit(loader)  # pyDVL names the one block ""
    native = tf.DirectInfluence(model, F.cross_entropy, 0.6).fit(loader)
    expected, _ = _block_diagonal_influences(model, x, y, x[:3], y[:3], {"": [n for n, _ in model.named_parameters()]},
                                             {"": 0.6})
    assert compat.blocks is None and compat.block_names == [""]
    for influence in (compat, named, native):
        _close(influence.influences(x[:3], y[:3], x, y), expected, 1e-10)


@pytest.mark.parametrize("simultaneously", [False, True])
def test_layer_wise_cg_matches_layer_wise_direct(mlp, simultaneously):
    model, x, y, loader = mlp
    direct = DirectInfluence(model, F.cross_entropy, LAYER_LAMBDAS, block_structure=BlockMode.LAYER_WISE).fit(loader)
    cg = CgInfluence(model, F.cross_entropy, LAYER_LAMBDAS, rtol=1e-10, atol=0.0, block_structure=BlockMode.LAYER_WISE,
                     solve_simultaneously=simultaneously).fit(loader)
    assert set(cg.block_solvers) == {"0", "2"}
    assert cg.block_solvers["0"].num_params == 16 and cg.block_solvers["2"].maxiter == 10 * 10
    _close(cg.influences(x[:4], y[:4], x, y), direct.influences(x[:4], y[:4], x, y), 1e-7)


def test_custom_block_dict_and_per_block_regularization(mlp):
    """A dict block structure, in its own order; blocks missing from the regularization dict get none.

    With the empirical Fisher (positive definite on the small unregularized block).
    """
    model, x, y, loader = mlp
    blocks = OrderedDict(rest=["2.weight", "0.weight", "2.bias"], first_bias=["0.bias"])
    influence = DirectInfluence(model, F.cross_entropy, {"rest": 0.6}, block_structure=blocks,
                                second_order_mode=SecondOrderMode.GAUSS_NEWTON).fit(loader)
    order_names = ["2.weight", "0.weight", "2.bias", "0.bias"]
    assert influence.functions.names == order_names  # flat order: block order
    assert influence.block_regularization == {"rest": 0.6, "first_bias": 0.0}
    factors = influence.influence_factors(x[:3], y[:3])
    # By hand: (1/n) G^T G permuted into block order, cross-block entries zeroed, lambda on the first block.
    _, names, sizes = _full_hessian(model, x[:1], y[:1])
    all_grads = _per_sample_grads(model, x, y)
    fisher = all_grads.T @ all_grads / x.shape[0]
    start = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist()))
    size = dict(zip(names, sizes))
    order = torch.cat([torch.arange(start[n], start[n] + size[n]) for n in order_names])
    h = fisher[order][:, order]
    n_rest = h.shape[0] - 4
    h[:n_rest, n_rest:] = 0
    h[n_rest:, :n_rest] = 0
    h[:n_rest, :n_rest] += 0.6 * torch.eye(n_rest, dtype=h.dtype)
    g_test = _per_sample_grads(model, x[:3], y[:3])[:, order]
    g = _per_sample_grads(model, x, y)[:, order]
    expected_factors = torch.linalg.solve(h, g_test.T).T
    _close(factors, expected_factors, 1e-10)
    _close(influence.influences(x[:3], y[:3], x, y), expected_factors @ g.T, 1e-10)


def test_woodbury_arnoldi_with_blocks(mlp):
    """use_woodbury=True keeps each block's complement / lambda_B; at full rank per block it is exact."""
    model, x, y, loader = mlp
    arnoldi = ArnoldiInfluence(model, F.cross_entropy, LAYER_LAMBDAS, rank=16, use_woodbury=True,
                               block_structure=BlockMode.LAYER_WISE).fit(loader)
    assert {name: solver.complement for name, solver in arnoldi.block_solvers.items()} == dict.fromkeys(
        LAYERS, "regularization")
    expected, _ = _block_diagonal_influences(model, x, y, x[:3], y[:3], LAYERS, LAYER_LAMBDAS)
    _close(arnoldi.influences(x[:3], y[:3], x, y), expected, 1e-8)  # Lanczos over every pair: float64 rounding


def test_block_with_regularization_refactors_the_right_block(mlp):
    model, x, y, loader = mlp
    influence = DirectInfluence(model, F.cross_entropy, 1.0, block_structure=BlockMode.LAYER_WISE).fit(loader)
    assert influence.with_regularization(LAYER_LAMBDAS) is influence
    assert influence.block_solvers["0"].regularization == 0.6 and influence.block_solvers["2"].regularization == 0.05
    expected, _ = _block_diagonal_influences(model, x, y, x[:3], y[:3], LAYERS, LAYER_LAMBDAS)
    _close(influence.influences(x[:3], y[:3], x, y), expected, 1e-10)
    cg = CgInfluence(model, F.cross_entropy, 1.0, rtol=1e-10, atol=0.0, block_structure=BlockMode.LAYER_WISE)
    cg.fit(loader).with_regularization(LAYER_LAMBDAS)
    _close(cg.influences(x[:3], y[:3], x, y), expected, 1e-7)
    with pytest.raises(ValueError, match=r"unknown block names \['1'\]"):
        influence.with_regularization({"1": 0.1})


def test_not_positive_definite_block_is_named(mlp):
    model, _, _, loader = mlp
    with pytest.raises(ValueError, match="block '0'"):
        DirectInfluence(model, F.cross_entropy, {"0": 0.0, "2": 1.0}, block_structure=BlockMode.LAYER_WISE).fit(loader)


@pytest.mark.parametrize("build, error, match", [
    (lambda m: DirectInfluence(m, F.cross_entropy, {"0": 0.5, "layer9": 0.1}, block_structure=BlockMode.LAYER_WISE),
     ValueError, r"regularization: unknown block names \['layer9'\]"),
    (lambda m: CgInfluence(m, F.cross_entropy, {"0.weight": -1.0}, block_structure=BlockMode.PARAMETER_WISE),
     ValueError, r"regularization\['0.weight'\]"),
    (lambda m: DirectInfluence(m, F.cross_entropy, 0.5, block_structure={"a": ["0.weight", "3.bias"]}),
     ValueError, r"block_structure\['a'\]: unknown parameter names \['3.bias'\]"),
    (lambda m: CgInfluence(m, F.cross_entropy, 0.5, block_structure={"a": ["0.weight"], "b": ["0.weight"]}),
     ValueError, "disjoint"),
    (lambda m: DirectInfluence(m, F.cross_entropy, 0.5, block_structure="diagonal"), ValueError, "block_structure"),
])
def test_bad_blocks_raise_naming_them(mlp, build, error, match):
    with pytest.raises(error, match=match):
        build(mlp[0])


def test_frozen_parameters_are_left_out_of_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].bias.requires_grad_(False)
    influence = DirectInfluence(model, F.cross_entropy, 0.5, block_structure=BlockMode.LAYER_WISE)
    assert influence.blocks == {"0": ["0.weight"], "2": ["2.weight", "2.bias"]}
    with pytest.warns(UserWarning, match="0.bias"):
        custom = DirectInfluence(model, F.cross_entropy, 0.5, block_structure={"a": ["0.weight", "0.bias"]})
    assert custom.blocks == {"a": ["0.weight"]} and custom.n_parameters == 12


def test_block_perturbation_and_parameter_wise_cg(mlp):
    """Perturbation scores use the block-diagonal factors; per-tensor CG blocks match Direct."""
    model, x, y, loader = mlp
    lambdas = dict.fromkeys(["0.weight", "0.bias", "2.weight", "2.bias"], 0.6)
    direct = DirectInfluence(model, F.cross_entropy, lambdas, block_structure=BlockMode.PARAMETER_WISE).fit(loader)
    factors = direct.influence_factors(x[:2], y[:2])
    native = tf.DirectInfluence(model, F.cross_entropy, 0.6).fit(loader)  # same flat order here
    torch.testing.assert_close(direct.influences(x[:2], y[:2], x[:5], y[:5], mode=InfluenceMode.Perturbation),
                               native.influences_from_factors(factors, x[:5], y[:5], mode="perturbation"))
    cg = CgInfluence(model, F.cross_entropy, 0.6, rtol=1e-10, atol=1e-12,
                     block_structure=BlockMode.PARAMETER_WISE).fit(loader)
    _close(cg.influences(x[:3], y[:3], x, y), direct.influences(x[:3], y[:3], x, y), 1e-7)


def test_layer_wise_leaves_out_parameters_outside_child_modules():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2, dtype=torch.float64))
            self.layer = nn.Linear(3, 2).double()

        def forward(self, x):
            return self.layer(x) * self.scale

    with pytest.warns(UserWarning, match=r"\['scale'\] belong to no child module"):
        influence = DirectInfluence(Scaled(), F.cross_entropy, 0.5, block_structure=BlockMode.LAYER_WISE)
    assert influence.blocks == {"layer": ["layer.weight", "layer.bias"]} and influence.n_parameters == 8


def test_inverse_harmonic_mean_influence_takes_pydvl_arguments():
    from torchfluence import pydvl as compat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    loss = torch.nn.functional.cross_entropy
    ours = compat.InverseHarmonicMeanInfluence(model, loss, 0.1).fit((x, y))  # pyDVL's default: one full block
    native = tf.InverseHarmonicMeanInfluence(model, loss, 0.1, block_structure="full").fit((x, y))
    assert torch.allclose(ours.influences(x[:3], y[:3], x, y, mode=compat.InfluenceMode.Up),
                          native.influences(x[:3], y[:3], x, y), rtol=1e-12, atol=1e-14)
    layered = compat.InverseHarmonicMeanInfluence(model, loss, {"0": 0.1, "2": 0.3},
                                                  block_structure=compat.BlockMode.LAYER_WISE).fit((x, y))
    by_layer = tf.InverseHarmonicMeanInfluence(model, loss, {"0": 0.1, "2": 0.3}).fit((x, y))
    assert torch.allclose(layered.influences(x[:3], y[:3], x, y), by_layer.influences(x[:3], y[:3], x, y),
                          rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="second_order_mode"):
        compat.InverseHarmonicMeanInfluence(model, loss, 0.1, second_order_mode=compat.SecondOrderMode.HESSIAN)
