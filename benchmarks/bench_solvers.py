"""Solvers on the digits MLP and CNN: fit and score time, error against the exact oracle.

Full 360 x 1437 influence matrix per solver. If pyDVL is importable (install
``pydvl[influence]`` in the benchmark's venv), its matching class runs on the
same model and data in the same process and the time ratio is printed.

    python benchmarks/bench_solvers.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import torchfluence as tfl  # noqa: E402
from _timing import environment, print_table  # noqa: E402

try:
    import pydvl.influence.torch as pydvl_influence
except ImportError:  # optional peer
    pydvl_influence = None

REG = 0.1


def digits_data(image: bool):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = x.view(-1, 1, 8, 8) if image else x
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order[:1437]], y[order[:1437]], x[order[1437:]], y[order[1437:]]


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def trained(kind, x, y):
    model = make_model(kind)
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def exact_matrix(model, x, y, xt, yt, reg: float = REG):
    """float64 oracle: explicit Hessian by torch.func.hessian, dense solve."""
    m64 = _double_copy(model)
    names = [n for n, _ in m64.named_parameters()]
    params = dict(m64.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def total(t):
        split = {n: v.view_as(params[n]) for n, v in zip(names, t.split(sizes))}
        return F.cross_entropy(torch.func.functional_call(m64, split, (x.double(),)), y)

    h = torch.func.hessian(total)(theta)
    im = tfl.DirectInfluence(m64, F.cross_entropy, reg, dtype=torch.float64)
    g_test, g = im.grads(xt.double(), yt), im.grads(x.double(), y)
    exact = torch.linalg.solve(h + reg * torch.eye(len(theta), dtype=h.dtype), g_test.T).T @ g.T
    return exact, float(torch.linalg.eigvalsh(h)[-1])


def _double_copy(model):
    return copy.deepcopy(model).double()


def time_torchfluence(make, loader, x, y, xt, yt):
    t0 = time.perf_counter()
    im = make().fit(loader)
    t1 = time.perf_counter()
    scores = im.influences(xt, yt, x, y)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, scores


def time_pydvl(cls_name, kwargs, model, loader, x, y, xt, yt):
    cls = getattr(pydvl_influence, cls_name)
    t0 = time.perf_counter()
    im = cls(model, F.cross_entropy, **kwargs).fit(loader)
    t1 = time.perf_counter()
    scores = im.influences(xt, yt, x, y, mode="up")
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MLP only")
    args = parser.parse_args()
    rows = []
    for kind in ("mlp",) if args.quick else ("mlp", "cnn"):
        x, y, xt, yt = digits_data(image=kind == "cnn")
        model = trained(kind, x, y)
        loader = DataLoader(TensorDataset(x, y), batch_size=256)
        exact, largest = exact_matrix(model, x, y, xt, yt)
        scale = 1.5 * (largest + REG)  # LiSSA needs scale > the largest eigenvalue of H + reg I
        solvers = {
            "direct": (lambda: tfl.DirectInfluence(model, F.cross_entropy, REG), "DirectInfluence",
                       {"hessian_regularization": REG}),
            "cg": (lambda: tfl.CgInfluence(model, F.cross_entropy, REG, rtol=1e-6), "CgInfluence",
                   {"regularization": REG, "rtol": 1e-6, "atol": 1e-10, "maxiter": 1000, "use_block_cg": True}),
            "lissa": (lambda: tfl.LissaInfluence(model, F.cross_entropy, REG, maxiter=200,
                                                 scale=scale), "LissaInfluence",
                      {"regularization": REG, "maxiter": 200, "scale": scale}),
        }
        for name, (make, peer_cls, peer_kwargs) in solvers.items():
            fit_t, score_t, scores = time_torchfluence(make, loader, x, y, xt, yt)
            err = float((scores.double() - exact).norm() / exact.norm())
            row = [kind, name, f"{fit_t:.2f}", f"{score_t:.2f}", f"{err:.1e}"]
            if pydvl_influence is not None:
                try:
                    pf, ps, pscores = time_pydvl(peer_cls, _pydvl_kwargs(peer_cls, peer_kwargs), model, loader,
                                                 x, y, xt, yt)
                    perr = float((pscores.double() - exact).norm() / exact.norm())
                    row += [f"{pf + ps:.2f}", f"{perr:.1e}", f"{(pf + ps) / (fit_t + score_t):.1f}x"]
                except Exception as error:  # report, never hide, a peer failure
                    row += [f"failed: {type(error).__name__}", "-", "-"]
            rows.append(row)
    print(environment(torch.device("cpu")))
    headers = ["model", "solver", "fit s", "score s", "rel. error vs exact"]
    if pydvl_influence is not None:
        headers += ["pyDVL total s", "pyDVL rel. error", "speed-up vs pyDVL"]
    print_table(headers, rows)


def _pydvl_kwargs(cls_name, kwargs):
    import inspect

    accepted = inspect.signature(getattr(pydvl_influence, cls_name)).parameters
    out = {}
    for key, value in kwargs.items():
        if key in accepted:
            out[key] = value
        elif key in ("hessian_regularization", "regularization"):
            other = "regularization" if key == "hessian_regularization" else "hessian_regularization"
            if other in accepted:
                out[other] = value
    return out


if __name__ == "__main__":
    main()
