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
    b[2] *= 1e-9  # below atol: x = 0 is already accurate enough
    rtol, atol = 1e-3, 1e-5
    cg = CgInfluence(model, F.cross_entropy, LAMBDA, rtol=rtol, atol=atol).fit(loader)
    solved = cg.solve(b)
    residual = (b - solved @ a).norm(dim=1)
    assert bool((residual <= torch.clamp(rtol * b.norm(dim=1), min=atol) * (1 + 1e-9)).all())
    assert cg.rtol == rtol  # restored after the grouped solves


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
        (lambda m: DirectInfluence(m, loss, LAMBDA, block_structure=BlockMode.LAYER_WISE), NotImplementedError,
         "block_structure"),
        (lambda m: CgInfluence(m, loss, LAMBDA, block_structure="parameter_wise"), NotImplementedError,
         "block_structure"),
        (lambda m: LissaInfluence(m, loss, LAMBDA, block_structure=OrderedDict(all=["weight", "bias"])),
         NotImplementedError, "block_structure"),
        (lambda m: NystroemSketchInfluence(m, loss, LAMBDA, 3, block_structure="diagonal"), ValueError,
         "block_structure"),
        (lambda m: DirectInfluence(m, loss, {"weight": LAMBDA}), NotImplementedError, "regularization"),
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
