"""Compares torchfluence.pydvl with pyDVL 0.10 on a tiny model; prints max relative differences.

Run with an environment that has both packages: ``python benchmarks/check_pydvl_compat.py``.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pydvl.influence.torch as ref
from pydvl.influence.torch.preconditioner import JacobiPreconditioner as RefJacobi
from pydvl.influence.torch.preconditioner import NystroemPreconditioner as RefNystroem
from pydvl.influence.torch.util import SecondOrderMode as RefMode
from pydvl.influence.types import InfluenceMode as RefInfluenceMode

import torchfluence as tf
import torchfluence.pydvl as ours

logging.disable(logging.WARNING)
warnings.filterwarnings("ignore")
LAMBDA = 0.1


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    return x, y


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    loader32 = DataLoader(TensorDataset(x.float(), y), batch_size=16)  # pyDVL's EK-FAC runs in float32 only
    torch.manual_seed(0)
    linear = nn.Linear(5, 3).double().eval()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    xt, yt = x[:8], y[:8]
    rows = []
    print(f"{'case':56}  max |ours - pyDVL| / max |pyDVL|")

    def compare(name, model, make_ours, make_ref, mode="up", float32=False):
        xs, ld = (x.float(), loader32) if float32 else (x, loader)
        a = make_ours(model).fit(ld).influences(xs[:8], yt, xs, y, mode=mode)
        b = make_ref(model).fit(ld).influences(xs[:8], yt, xs, y, mode=RefInfluenceMode(mode))
        rows.append((name, relative(a.double(), b.double())))
        print(f"{name:56}  {rows[-1][1]:.2e}", flush=True)

    ce = F.cross_entropy
    for label, model in (("linear", linear), ("mlp", mlp)):
        reg = LAMBDA if label == "linear" else 1.0  # the MLP's Hessian is indefinite at init
        compare(f"Direct HESSIAN [{label}]", model, lambda m: ours.DirectInfluence(m, ce, reg),
                lambda m: ref.DirectInfluence(m, ce, reg))
        compare(f"Direct GAUSS_NEWTON [{label}]", model,
                lambda m: ours.DirectInfluence(m, ce, reg, second_order_mode=ours.SecondOrderMode.GAUSS_NEWTON),
                lambda m: ref.DirectInfluence(m, ce, reg, second_order_mode=RefMode.GAUSS_NEWTON))
        compare(f"Direct perturbation [{label}]", model, lambda m: ours.DirectInfluence(m, ce, reg),
                lambda m: ref.DirectInfluence(m, ce, reg), mode="perturbation")
        compare(f"Cg GAUSS_NEWTON rtol=1e-10 [{label}]", model,
                lambda m: ours.CgInfluence(m, ce, reg, rtol=1e-10, atol=1e-12,
                                           second_order_mode=ours.SecondOrderMode.GAUSS_NEWTON),
                lambda m: ref.CgInfluence(m, ce, reg, rtol=1e-10, atol=1e-12, second_order_mode=RefMode.GAUSS_NEWTON))
        for simultaneous in (False, True):
            compare(f"Cg solve_simultaneously={simultaneous} rtol=1e-10 [{label}]", model,
                    lambda m: ours.CgInfluence(m, ce, reg, rtol=1e-10, atol=1e-12, solve_simultaneously=simultaneous),
                    lambda m: ref.CgInfluence(m, ce, reg, rtol=1e-10, atol=1e-12,
                                              solve_simultaneously=simultaneous))
        compare(f"Cg defaults [{label}]", model, lambda m: ours.CgInfluence(m, ce, reg),
                lambda m: ref.CgInfluence(m, ce, reg))
        compare(f"Cg Jacobi [{label}]", model,
                lambda m: ours.CgInfluence(m, ce, reg, rtol=1e-10, atol=1e-12,
                                           preconditioner=ours.JacobiPreconditioner(10)),
                lambda m: ref.CgInfluence(m, ce, reg, rtol=1e-10, atol=1e-12, preconditioner=RefJacobi(10)))
        if label == "linear":
            compare(f"Cg Nystroem [{label}]", model,
                    lambda m: ours.CgInfluence(m, ce, reg, rtol=1e-10, atol=1e-12,
                                               preconditioner=ours.NystroemPreconditioner(5)),
                    lambda m: ref.CgInfluence(m, ce, reg, rtol=1e-10, atol=1e-12, preconditioner=RefNystroem(5)))
        p = sum(q.numel() for q in model.parameters())
        compare(f"Arnoldi full rank [{label}]", model, lambda m: ours.ArnoldiInfluence(m, ce, reg, rank=p),
                lambda m: ref.ArnoldiInfluence(m, ce, reg, rank=p - 1))
        compare(f"Arnoldi rank 8 use_woodbury [{label}]", model,
                lambda m: ours.ArnoldiInfluence(m, ce, reg, rank=8, use_woodbury=True),
                lambda m: ref.ArnoldiInfluence(m, ce, reg, rank=8, use_woodbury=True))
        compare(f"Lissa maxiter=500 scale=20 [{label}]", model,
                lambda m: ours.LissaInfluence(m, ce, reg, maxiter=500, scale=20.0, rtol=0.0),
                lambda m: ref.LissaInfluence(m, ce, reg, maxiter=500, scale=20.0, rtol=0.0))
        if label == "linear":
            compare(f"Nystroem rank=p [{label}]", model, lambda m: ours.NystroemSketchInfluence(m, ce, reg, p),
                    lambda m: ref.NystroemSketchInfluence(m, ce, reg, p))
        for diag in (False, True):
            compare(f"Ekfac update_diagonal={diag} float32 [{label}]", copy.deepcopy(model).float(),
                    lambda m: ours.EkfacInfluence(m, update_diagonal=diag, hessian_regularization=reg),
                    lambda m: ref.EkfacInfluence(m, update_diagonal=diag, hessian_regularization=reg),
                    float32=True)
    # pyDVL's explicit GAUSS_NEWTON matrix (DirectInfluence) divides the sum of the batches' G^T G,
    # without the first batch's count, by p per further batch instead of by n.
    from pydvl.influence.torch.functional import gauss_newton
    ours_matrix = ours.DirectInfluence(linear, F.cross_entropy, LAMBDA,
                                       second_order_mode=ours.SecondOrderMode.GAUSS_NEWTON).fit(loader).curvature
    p, batches = ours_matrix.shape[0], len(loader)
    rescaled = ours_matrix * len(x) / (p * (batches - 1))
    print(f"pyDVL gauss_newton() vs ours * n / (p * (batches - 1)): {relative(rescaled, gauss_newton(linear, F.cross_entropy, loader).double()):.2e}")
    # EK-FAC against the exact Fisher (= GGN for cross-entropy), on the linear model in float32.
    m32 = copy.deepcopy(linear).float()
    loader32 = DataLoader(TensorDataset(x.float(), y), batch_size=16)
    exact = tf.DirectInfluence(m32, F.cross_entropy, LAMBDA, second_order="gauss_newton", dtype=torch.float64)
    exact = exact.fit(loader32).influences(x[:8].float(), y[:8], x.float(), y).double()
    for diag in (False, True):
        a = ours.EkfacInfluence(m32, update_diagonal=diag, hessian_regularization=LAMBDA).fit(loader32)
        b = ref.EkfacInfluence(m32, update_diagonal=diag, hessian_regularization=LAMBDA).fit(loader32)
        xs = x.float()
        print(f"Ekfac update_diagonal={diag} vs exact-Fisher Direct: ours "
              f"{relative(a.influences(xs[:8], y[:8], xs, y).double(), exact):.2e}, pyDVL "
              f"{relative(b.influences(xs[:8], y[:8], xs, y).double(), exact):.2e}")


if __name__ == "__main__":
    main()
