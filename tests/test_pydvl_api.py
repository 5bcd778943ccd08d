"""torchfluence.pydvl's API beyond the constructors: pyDVL's exception classes, ``.to(device)``,
the block (composable) API and preconditioners fitted and applied on their own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchfluence.pydvl import (ArnoldiInfluence, BlockMode, CgInfluence, DirectInfluence, EkfacInfluence,
                                InverseHarmonicMeanInfluence, JacobiPreconditioner, LissaInfluence,
                                NotFittedException, NotImplementedLayerRepresentationException,
                                NystroemPreconditioner, NystroemSketchInfluence, SecondOrderMode,
                                UnsupportedInfluenceModeException)

LAMBDA = 1.0  # H of the tanh network has negative eigenvalues down to about -0.4


@pytest.fixture(scope="module")
def problem():
    """A two-layer tanh regression network, float64 (exact comparisons)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randn(24, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double().eval()
    return model, x, y, DataLoader(TensorDataset(x, y), batch_size=8)


FACTORIES = {
    "direct": lambda m, s: DirectInfluence(m, F.mse_loss, LAMBDA, block_structure=s),
    "cg": lambda m, s: CgInfluence(m, F.mse_loss, LAMBDA, block_structure=s, rtol=1e-10, atol=0,
                                   solve_simultaneously=True),
    "lissa": lambda m, s: LissaInfluence(m, F.mse_loss, LAMBDA, block_structure=s, maxiter=50, scale=50),
    "arnoldi": lambda m, s: ArnoldiInfluence(m, F.mse_loss, LAMBDA, rank=4, use_woodbury=True, block_structure=s),
    "nystroem": lambda m, s: NystroemSketchInfluence(m, F.mse_loss, LAMBDA, rank=4, block_structure=s,
                                                     second_order_mode=SecondOrderMode.GAUSS_NEWTON),
    "datainf": lambda m, s: InverseHarmonicMeanInfluence(m, F.mse_loss, LAMBDA, block_structure=s),
}


# -- exceptions -------------------------------------------------------------------------------------
def test_exceptions_subclass_the_builtins_caught_before():
    assert issubclass(NotFittedException, RuntimeError) and issubclass(NotFittedException, ValueError)
    assert issubclass(UnsupportedInfluenceModeException, ValueError)
    assert issubclass(NotImplementedLayerRepresentationException, NotImplementedError)
    assert issubclass(NotImplementedLayerRepresentationException, ValueError)


def test_pydvls_own_exceptions_are_caught_by_the_same_names():
    """pyDVL's code around a solver (its calculators check the mode themselves) raises pyDVL's
    classes; the torchfluence classes of the same names match them in isinstance, issubclass and
    pytest.raises (a bare ``except`` checks real inheritance only), and nothing else of that name."""
    pydvls = type("UnsupportedInfluenceModeException", (ValueError,), {"__module__": "pydvl.influence.types"})
    with pytest.raises(UnsupportedInfluenceModeException):
        raise pydvls("fancy_influence")
    assert isinstance(pydvls("fancy_influence"), UnsupportedInfluenceModeException)
    elsewhere = type("UnsupportedInfluenceModeException", (ValueError,), {"__module__": "mylib"})
    assert not issubclass(elsewhere, UnsupportedInfluenceModeException)
    assert not issubclass(pydvls, NotFittedException)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_not_fitted_and_bad_mode(problem, name):
    model, x, y, loader = problem
    solver = FACTORIES[name](model, BlockMode.LAYER_WISE)
    with pytest.raises(NotFittedException, match="not fitted"):
        solver.influences(x[:2], y[:2], x, y)
    with pytest.raises(RuntimeError):  # what torchfluence raised before the pyDVL name
        solver.influence_factors(x[:2], y[:2])
    solver.fit(loader)
    with pytest.raises(UnsupportedInfluenceModeException, match="strange_mode"):
        solver.influences(x[:2], y[:2], mode="strange_mode")
    with pytest.raises(ValueError):
        solver.influences_by_block(x[:2], y[:2], mode="strange_mode")


def test_ekfac_singular_conv_raises_pydvls_exception():
    """pyDVL's EK-FAC represents Linear layers only; a conv layer whose curvature is singular at
    hessian_regularization=0 gets pyDVL's exception (and is still a ValueError)."""
    torch.manual_seed(0)
    # Two samples of one 8x3 patch each: the conv layer's input factor (25 x 25) has rank 2.
    model = nn.Sequential(nn.Conv1d(8, 3, 3), nn.Flatten(), nn.Linear(3, 3)).eval()
    x, y = torch.randn(2, 8, 3), torch.randint(0, 3, (2,))
    solver = EkfacInfluence(model, update_diagonal=True, hessian_regularization=0.0)
    with pytest.raises(NotImplementedLayerRepresentationException, match="0"):
        solver.fit(DataLoader(TensorDataset(x, y), batch_size=2))


# -- .to(device) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_to_returns_self_and_keeps_results(problem, name):
    model, x, y, loader = problem
    solver = FACTORIES[name](model, BlockMode.FULL)
    assert solver.to("cpu") is solver and solver.to(torch.device("cpu")) is solver
    fitted = solver.fit(loader)
    assert fitted.to("cpu") is fitted
    assert fitted.influences(x[:2], y[:2], x, y).shape == (2, 24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_moves_a_fitted_solver(problem):
    model, x, y, loader = problem
    solver = CgInfluence(model, F.mse_loss, LAMBDA, block_structure=BlockMode.LAYER_WISE, rtol=1e-10, atol=0)
    before = solver.fit(loader).influences(x[:2], y[:2], x, y)
    moved = solver.to("cuda")
    assert moved is solver and solver.device.type == "cuda"
    torch.testing.assert_close(solver.influences(x[:2], y[:2], x, y).cpu(), before, rtol=1e-6, atol=1e-9)
    solver.to("cpu")


# -- the block API ----------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", [BlockMode.FULL, BlockMode.LAYER_WISE, BlockMode.PARAMETER_WISE])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_block_api_sums_to_the_influences(problem, name, structure):
    """Each block's factors are the block's columns; the blocks' scores sum to the influences."""
    model, x, y, loader = problem
    solver = FACTORIES[name](model, structure).fit(loader)
    if name in ("lissa", "nystroem", "arnoldi", "datainf"):  # random or early-stopped: fix the factors once
        factors = solver.influence_factors(x[:3], y[:3])
        solver.influence_factors = lambda *_: factors
    full = solver.influences(x[:3], y[:3], x, y)
    factors = solver.influence_factors(x[:3], y[:3])
    by_block = solver.influence_factors_by_block(x[:3], y[:3])
    expected = {BlockMode.FULL: [""], BlockMode.LAYER_WISE: ["0", "2"],
                BlockMode.PARAMETER_WISE: ["0.weight", "0.bias", "2.weight", "2.bias"]}[structure]
    assert list(by_block) == expected
    assert sum(f.shape[1] for f in by_block.values()) == factors.shape[1]
    scores = solver.influences_by_block(x[:3], y[:3], x, y)
    assert list(scores) == expected and all(s.shape == (3, 24) for s in scores.values())
    # Sums of the same products in another order: float64 rounding.
    torch.testing.assert_close(sum(scores.values()), full, rtol=1e-9, atol=1e-12)
    again = solver.influences_from_factors_by_block(by_block, x, y)
    for block in expected:
        torch.testing.assert_close(again[block], scores[block], rtol=1e-12, atol=1e-14)
    perturbation = solver.influences_by_block(x[:3], y[:3], x[:5], y[:5], mode="perturbation")
    assert all(p.shape == (3, 5, 4) for p in perturbation.values())
    with pytest.raises(ValueError, match="one entry per block"):
        solver.influences_from_factors_by_block({"nope": factors}, x, y)


def test_block_api_matches_direct_blocks(problem):
    """Block b's scores are g_test,b^T (H_bb + lambda I)^-1 g_b, computed here from the explicit matrix."""
    model, x, y, loader = problem
    solver = DirectInfluence(model, F.mse_loss, LAMBDA, block_structure=BlockMode.LAYER_WISE).fit(loader)
    scores = solver.influences_by_block(x[:2], y[:2], x, y)
    grads, test_grads = solver.grads(x, y), solver.grads(x[:2], y[:2])
    full_h = solver.curvature
    start = 0
    for block in ("0", "2"):
        size = sum(p.numel() for p in getattr(model, block).parameters())
        cols = slice(start, start + size)
        h = full_h[cols, cols] + LAMBDA * torch.eye(size, dtype=torch.float64)
        expected = test_grads[:, cols] @ torch.linalg.solve(h, grads[:, cols].T)
        torch.testing.assert_close(scores[block], expected, rtol=1e-8, atol=1e-12)
        start += size


def test_nystroem_preconditioner_rank_above_a_block_size(problem):
    """A block with fewer parameters than the sketch's rank gets a sketch of its size."""
    model, x, y, loader = problem
    solver = CgInfluence(model, F.mse_loss, LAMBDA, block_structure=BlockMode.PARAMETER_WISE, rtol=1e-10, atol=0,
                         preconditioner=NystroemPreconditioner(rank=5), solve_simultaneously=True,
                         second_order_mode=SecondOrderMode.GAUSS_NEWTON).fit(loader)
    direct = DirectInfluence(model, F.mse_loss, LAMBDA, block_structure=BlockMode.PARAMETER_WISE,
                             second_order_mode=SecondOrderMode.GAUSS_NEWTON).fit(loader)
    torch.testing.assert_close(solver.influences(x[:2], y[:2], x, y), direct.influences(x[:2], y[:2], x, y),
                               rtol=1e-6, atol=1e-9)


def test_datainf_blocks_with_a_frozen_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double().eval()
    for p in model[0].parameters():
        p.requires_grad_(False)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    solver = InverseHarmonicMeanInfluence(model, F.mse_loss, 0.1, block_structure=BlockMode.LAYER_WISE)
    solver.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    assert list(solver.influences_by_block(x[:2], y[:2], x, y)) == ["2"]


# -- preconditioners on their own -------------------------------------------------------------------
def _spd(size: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(size, rank, generator=g, dtype=torch.float64)
    return u @ u.T + 0.1 * torch.eye(size, dtype=torch.float64)


def test_preconditioners_fit_and_solve_on_their_own():
    a = _spd(60, 8, 0)
    for preconditioner in (JacobiPreconditioner(3), NystroemPreconditioner(12)):
        assert not preconditioner.is_fitted
        with pytest.raises(NotFittedException):
            preconditioner.solve(torch.ones(60, dtype=torch.float64))
        assert preconditioner.fit(a, 0.01) is preconditioner and preconditioner.is_fitted
        # (p,) and (p, k) right-hand sides (vectors as columns, pyDVL's layout) agree.
        rhs = torch.randn(60, 3, dtype=torch.float64)
        columns = preconditioner.solve(rhs)
        assert columns.shape == (60, 3)
        torch.testing.assert_close(preconditioner.solve(rhs[:, 1]), columns[:, 1])
    # Nystroem with rank above the matrix's: the exact inverse up to the scale l_min + lambda.
    exact = NystroemPreconditioner(80).fit(a, 0.01)
    conditioned = exact.solve(a + 0.01 * torch.eye(60, dtype=torch.float64))
    assert float(torch.linalg.cond(conditioned)) < 1 + 1e-6


def test_jacobi_preconditioner_exact_on_a_diagonal_matrix():
    d = torch.linspace(1, 1e4, 50, dtype=torch.float64)
    preconditioner = JacobiPreconditioner(1).fit(torch.diag(d), 1.0)
    # Rademacher probes recover a diagonal matrix's diagonal exactly.
    torch.testing.assert_close(preconditioner.solve(torch.ones(50, dtype=torch.float64)), 1 / (d + 1.0))


def test_preconditioner_takes_pydvl_operator_interface():
    a = _spd(30, 4, 1)

    class Operator:  # pyDVL's TensorOperator interface: apply() on rows, input_size, dtype, device
        input_size, dtype, device = 30, torch.float64, torch.device("cpu")

        def apply(self, rows):
            return rows @ a.T

    p = NystroemPreconditioner(10).fit(Operator(), 0.1)
    q = NystroemPreconditioner(10).fit(a, 0.1)
    rhs = torch.randn(30, 2, dtype=torch.float64)
    torch.testing.assert_close(p.solve(rhs), q.solve(rhs))
    with pytest.raises(TypeError, match="TensorOperator"):
        JacobiPreconditioner().fit("matrix")
