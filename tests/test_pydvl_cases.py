"""pyDVL's documented influence cases, as a table: every pyDVL-compatible class x mode x block structure
against the closed-form influences of a linear regression (float64).

Model: ``nn.Sequential(nn.Linear(d, 1))`` with the mean squared error, ``theta = [w, b]``, ``z = [x, 1]``:

    g_i = 2 (z_i . theta - y_i) z_i,        H = (2/n) Z^T Z   (exact, also the Gauss-Newton matrix)

    up:           I[t, j] = g_t^T (H + lambda I)^-1 g_j
    perturbation: P[t, j] = d/dx_j  g_t^T (H + lambda I)^-1 g_j(x_j)      (n_test, n, d)

Block structures: ``LAYER_WISE`` is one block here (one layer); ``PARAMETER_WISE`` splits
the weight and the bias, so H loses its cross terms: the closed form uses the
block-diagonal H. Tolerances: exact solvers (Direct, full-rank Arnoldi / Nystroem)
1e-9 relative to the largest entry, float64 rounding of a 4 x 4 solve; CG at rtol 1e-12
1e-8; LiSSA, a stochastic fixed-point iteration stopped at rtol 1e-10 with scale above
the largest eigenvalue, 1e-3. Block structures: every class that takes them (EK-FAC is
layer-wise by construction).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchfluence import pydvl

LAMBDA = 0.5
N, D = 24, 3


def _problem():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64) + 0.2 * torch.randn(N, 1, generator=g,
                                                                                           dtype=torch.float64)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(D, 1)).double().eval()  # a child module: LAYER_WISE has one block
    return model, x, y


def _closed_form(model, x, y, blocks: str):
    """(up (n_test, n), perturbation (n_test, n, d)) for test points x[:4] against all of x."""
    theta = torch.cat([model[0].weight.detach().reshape(-1), model[0].bias.detach()])

    def grads(xs, ys):
        z = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=xs.dtype)], dim=1)
        return 2 * (z @ theta - ys[:, 0])[:, None] * z

    z = torch.cat([x, torch.ones(N, 1, dtype=x.dtype)], dim=1)
    hessian = 2 * z.T @ z / N
    if blocks == "parameter_wise":
        hessian[:D, D:] = 0
        hessian[D:, :D] = 0
    factors = torch.linalg.solve(hessian + LAMBDA * torch.eye(D + 1, dtype=torch.float64), grads(x[:4], y[:4]).T).T
    up = factors @ grads(x, y).T
    xs = x.clone().requires_grad_(True)
    per_sample = grads(xs, y)  # g_j depends on x_j only
    perturbation = torch.stack([torch.autograd.grad((per_sample @ f).sum(), xs, retain_graph=True)[0]
                                for f in factors])  # (n_test, n, d)
    return up, perturbation


def _solvers():
    block = {"full": pydvl.BlockMode.FULL, "layer_wise": pydvl.BlockMode.LAYER_WISE,
             "parameter_wise": pydvl.BlockMode.PARAMETER_WISE}
    cases = []
    for blocks in ("full", "layer_wise", "parameter_wise"):
        b = block[blocks]
        cases.append((f"direct-{blocks}", blocks, 1e-9,
                      lambda m, b=b: pydvl.DirectInfluence(m, F.mse_loss, LAMBDA, block_structure=b)))
        for simultaneously in (True, False):
            cases.append((f"cg-{'block' if simultaneously else 'single'}-{blocks}", blocks, 1e-8,
                          lambda m, b=b, s=simultaneously: pydvl.CgInfluence(
                              m, F.mse_loss, LAMBDA, rtol=1e-12, atol=0.0, block_structure=b,
                              solve_simultaneously=s)))
        # Full rank per block: exact for the (block-diagonal) curvature.
        cases.append((f"arnoldi-full-rank-{blocks}", blocks, 1e-9,
                      lambda m, b=b: pydvl.ArnoldiInfluence(m, F.mse_loss, LAMBDA, rank=D + 1, block_structure=b)))
        cases.append((f"nystroem-full-rank-{blocks}", blocks, 1e-9,
                      lambda m, b=b: pydvl.NystroemSketchInfluence(m, F.mse_loss, LAMBDA, rank=D + 1,
                                                                   block_structure=b)))
        cases.append((f"lissa-{blocks}", blocks, 1e-3,
                      lambda m, b=b: pydvl.LissaInfluence(m, F.mse_loss, LAMBDA, maxiter=5000, rtol=1e-10,
                                                          scale=20.0, block_structure=b)))
    return cases


CASES = _solvers()


@pytest.mark.parametrize("mode", [pydvl.InfluenceMode.Up, pydvl.InfluenceMode.Perturbation])
@pytest.mark.parametrize("name, blocks, rtol, build", CASES, ids=[c[0] for c in CASES])
def test_closed_form_linear_regression(name, blocks, rtol, build, mode):
    model, x, y = _problem()
    up, perturbation = _closed_form(model, x, y, "parameter_wise" if blocks == "parameter_wise" else "full")
    expected = up if mode == pydvl.InfluenceMode.Up else perturbation
    loader = DataLoader(TensorDataset(x, y), batch_size=N)  # one batch: LiSSA's minibatches are the full data
    influence = build(model).fit(loader)
    got = influence.influences(x[:4], y[:4], x, y, mode=mode)
    assert got.shape == expected.shape
    error = float((got - expected).abs().max()) / float(expected.abs().max())
    assert error <= rtol, f"{name}, {mode.value}: relative error {error:.2e} > {rtol:.0e}"
    factors = influence.influence_factors(x[:4], y[:4])
    again = influence.influences_from_factors(factors, x, y, mode=mode)
    assert float((again - got).abs().max()) <= 1e-12 * float(expected.abs().max())
