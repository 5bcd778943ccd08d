"""Approximate solvers against the exact float64 oracle on the digits MLP and CNN.

For each solver: fit + score time for the full 360 x 1437 influence matrix, and
its Pearson and Spearman correlation with the exact influences, over the
flattened matrix and averaged over test rows. kronfluence (EK-FAC) and pyDVL
(EK-FAC, Arnoldi, Nystrom) run on the same model and data in the same process
when importable (install them in the benchmark's venv).

    python benchmarks/bench_approx.py [--quick] [--reg 0.01] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import torchfluence as tfl  # noqa: E402
from _timing import environment, print_table  # noqa: E402
from bench_solvers import digits_data, exact_matrix, trained  # noqa: E402

try:
    import pydvl.influence.torch as pydvl_influence
except ImportError:  # optional peer
    pydvl_influence = None
try:
    import kronfluence
except ImportError:  # optional peer
    kronfluence = None

RANK = 10
CG_ITERATIONS = 20


def rank_of(v: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(v)
    out[v.argsort(dim=-1)] = torch.arange(v.shape[-1], dtype=v.dtype)
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def fidelity(scores: torch.Tensor, exact: torch.Tensor) -> list[str]:
    """Pearson / Spearman, flattened and mean over test rows."""
    scores = scores.double()
    flat = [pearson(scores.flatten(), exact.flatten()), pearson(rank_of(scores.flatten()), rank_of(exact.flatten()))]
    rows = [sum(pearson(s, e) for s, e in zip(scores, exact)) / len(exact),
            sum(pearson(rank_of(s), rank_of(e)) for s, e in zip(scores, exact)) / len(exact)]
    return [f"{v:.3f}" for v in flat + rows]


def timed(run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG's non-convergence warning at a fixed iteration count
        scores = run()
    return time.perf_counter() - t0, scores


def ours(model, reg, loader, x, y, xt, yt) -> dict[str, Callable[[], torch.Tensor]]:
    loss = F.cross_entropy

    def run(make):
        return lambda: make().fit(loader).influences(xt, yt, x, y)

    return {
        "EK-FAC": run(lambda: tfl.EkfacInfluence(model, loss, reg)),
        "EK-FAC, 4 Fisher samples": run(lambda: tfl.EkfacInfluence(model, loss, reg, fisher_samples=4)),
        "EK-FAC, exact Fisher": run(lambda: tfl.EkfacInfluence(model, loss, reg, fisher="exact")),
        "K-FAC": run(lambda: tfl.KfacInfluence(model, loss, reg)),
        f"Arnoldi r={RANK}, complement kept": run(lambda: tfl.ArnoldiInfluence(model, loss, reg, RANK)),
        f"Arnoldi r={RANK}, complement dropped": run(
            lambda: tfl.ArnoldiInfluence(model, loss, reg, RANK, complement="drop")),
        f"Nystrom r={RANK} (GGN)": run(
            lambda: tfl.NystroemSketchInfluence(model, loss, reg, RANK, second_order="gauss_newton")),
        f"CG, {CG_ITERATIONS} it.": run(lambda: tfl.CgInfluence(model, loss, reg, maxiter=CG_ITERATIONS)),
        f"CG + Jacobi, {CG_ITERATIONS} it.": run(
            lambda: tfl.CgInfluence(model, loss, reg, maxiter=CG_ITERATIONS, preconditioner="jacobi")),
        f"CG + EK-FAC, {CG_ITERATIONS} it.": run(
            lambda: tfl.CgInfluence(model, loss, reg, maxiter=CG_ITERATIONS, preconditioner="ekfac")),
        f"CG + Nystrom r=32, {CG_ITERATIONS} it.": run(
            lambda: tfl.CgInfluence(model, loss, reg, maxiter=CG_ITERATIONS, preconditioner="nystroem")),
    }


def peers(model, reg, loader, x, y, xt, yt) -> dict[str, Callable[[], torch.Tensor]]:
    out = {}
    if kronfluence is not None:
        out["kronfluence EK-FAC"] = lambda: kronfluence_ekfac(model, reg, x, y, xt, yt, "ekfac")
        out["kronfluence K-FAC"] = lambda: kronfluence_ekfac(model, reg, x, y, xt, yt, "kfac")
    if pydvl_influence is not None:
        def run(cls_name, **kwargs):
            def go():
                im = getattr(pydvl_influence, cls_name)(copy.deepcopy(model), F.cross_entropy, **kwargs) \
                    if cls_name != "EkfacInfluence" else pydvl_influence.EkfacInfluence(copy.deepcopy(model), **kwargs)
                return im.fit(loader).influences(xt, yt, x, y, mode="up")
            return go

        out["pyDVL EK-FAC"] = run("EkfacInfluence", hessian_regularization=reg)
        out[f"pyDVL Arnoldi r={RANK}"] = run("ArnoldiInfluence", rank=RANK, regularization=reg)
        out[f"pyDVL Arnoldi r={RANK}, Woodbury"] = run("ArnoldiInfluence", rank=RANK, regularization=reg,
                                                       use_woodbury=True)
        out[f"pyDVL Nystrom r={RANK}"] = run("NystroemSketchInfluence", rank=RANK, regularization=reg)
    return out


def kronfluence_ekfac(model, reg, x, y, xt, yt, strategy: str) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    task = Classification()
    prepared = prepare_model(copy.deepcopy(model), task)
    with tempfile.TemporaryDirectory() as out_dir:
        analyzer = Analyzer("bench", prepared, task, cpu=True, disable_tqdm=True, output_dir=out_dir)
        factor_args = FactorArguments(strategy=strategy)
        train, test = TensorDataset(x, y), TensorDataset(xt, yt)
        analyzer.fit_all_factors("f", train, per_device_batch_size=256, factor_args=factor_args)
        analyzer.compute_pairwise_scores("s", "f", test, train, per_device_query_batch_size=len(xt),
                                         per_device_train_batch_size=256,
                                         score_args=ScoreArguments(damping_factor=reg))
        scores = analyzer.load_pairwise_scores("s")
    # kronfluence sums losses, so its gradients are per-sample ones and its factors are
    # means: the same scale as ours.
    return scores["all_modules"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MLP only")
    parser.add_argument("--reg", type=float, default=0.01, help="regularization (damping)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for kind in ("mlp",) if args.quick else ("mlp", "cnn"):
        x, y, xt, yt = digits_data(image=kind == "cnn")
        model = trained(kind, x, y)
        loader = DataLoader(TensorDataset(x, y), batch_size=256)
        exact, _ = exact_matrix(model, x, y, xt, yt, reg=args.reg)
        runs = {**ours(model, args.reg, loader, x, y, xt, yt), **peers(model, args.reg, loader, x, y, xt, yt)}
        for name, run in runs.items():
            try:
                seconds, scores = timed(run)
                rows.append([kind, name, f"{seconds:.2f}", *fidelity(scores, exact)])
            except Exception as error:  # report, never hide, a failure
                rows.append([kind, name, f"failed: {type(error).__name__}", "-", "-", "-", "-"])
            print(" | ".join(rows[-1]), flush=True)
    env = environment(torch.device("cpu"))
    print(env)
    print(f"regularization {args.reg}; full {len(xt)} x {len(x)} matrix; exact = float64 Hessian + dense solve")
    text = print_table(["model", "solver", "fit + score s", "Pearson", "Spearman", "Pearson/row", "Spearman/row"],
                       rows)
    if args.markdown:
        Path(args.markdown).write_text(env + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
