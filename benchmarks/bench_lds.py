"""Linear datamodeling score (LDS) of every solver on the digits MLP.

A small MLP is trained on the full digits training set; each solver scores the
test points against the training points. The same MLP (same initial weights,
same seed, same number of epochs) is then retrained on m random halves of the
training set, and ``torchfluence.evaluation.lds`` compares, per test point, the
ranking of the m retrained models' test losses with the ranking the summed
scores predict. The table gives each solver's mean LDS over the test points,
its standard error over the test points, and its standard error due to the
finite number m of retrained models (delete-a-group jackknife).

The retraining is checkpointed (``retrain_subsets(checkpoint=...)``): an
interrupted run picks up where it stopped. The default checkpoint path encodes
every training setting, so a run with other settings never reuses it.

    python benchmarks/bench_lds.py [--m 100] [--n-train 1000] [--epochs 50] [--markdown FILE]

Rows are the entries of ``scorers()``: a name and a function of the trained
setting returning (n_test, n_train) scores with torchfluence's sign
(positive = helpful). Add a solver by adding an entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
import torchfluence as tfl  # noqa: E402
from _timing import environment, print_table  # noqa: E402
from torchfluence.evaluation import lds, retrain_subsets  # noqa: E402

from tests.digits import digits, exact_hessian, mlp  # noqa: E402

LOSS = F.cross_entropy
REFERENCE = "Direct (Hessian)"  # the row the others' relative difference is measured against


@dataclass
class Setting:
    """The trained model and its data; what every scoring function receives."""

    model: nn.Module
    x: Tensor  # (n_train, 64)
    y: Tensor  # (n_train,)
    x_test: Tensor  # (n_test, 64)
    y_test: Tensor  # (n_test,)
    reg: float
    batch_size: int
    rank: int

    @property
    def loader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y),
                                           batch_size=self.batch_size)


Scorer = Callable[[Setting], Tensor]


def scorers() -> dict[str, Scorer]:
    """name -> function returning (n_test, n_train) influence scores; one table row each."""

    def solver(make) -> Scorer:
        def run(s: Setting) -> Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # CG / LiSSA warnings at a fixed iteration count
                im = make(s).fit(s.loader)
                return im.influences(s.x_test, s.y_test, s.x, s.y)
        return run

    def lissa(s: Setting):
        # LiSSA needs scale > the largest eigenvalue of H + reg I: taken from the exact
        # Hessian here (the model is small), with a 1.5x margin.
        largest = float(torch.linalg.eigvalsh(exact_hessian(s.model, LOSS, s.x, s.y))[-1])
        return tfl.LissaInfluence(s.model, LOSS, s.reg, maxiter=1000, scale=1.5 * (largest + s.reg))

    def gradient_similarity(s: Setting) -> Tensor:
        # The identity-curvature baseline: grad L(z_test) . grad L(z_train), the per-sample
        # gradients read from a solver's grads() (no curvature is fitted or used).
        im = tfl.DirectInfluence(s.model, LOSS, s.reg)
        return im.grads(s.x_test, s.y_test) @ im.grads(s.x, s.y).T

    def num_params(s: Setting) -> int:
        return sum(q.numel() for q in s.model.parameters())

    def sjlt(s: Setting, k: int) -> tfl.SparseJLProjector:
        return tfl.SparseJLProjector(num_params(s), k, seed=0)

    def empirical_fisher(s: Setting):
        # The unprojected empirical Fisher (1/n) sum g g^T: what the projected-Fisher rows
        # approximate, so their gap to it is the projection's alone.
        from torchfluence.pydvl import EmpiricalFisher
        return tfl.DirectInfluence(s.model, LOSS, s.reg, curvature=EmpiricalFisher)

    def random_scores(s: Setting) -> Tensor:
        # Noise floor: scores that know nothing about the model.
        g = torch.Generator().manual_seed(0)
        return torch.randn(len(s.x_test), len(s.x), generator=g, dtype=torch.float64)

    return {
        "Direct (Hessian)": solver(lambda s: tfl.DirectInfluence(s.model, LOSS, s.reg)),
        "Direct (Gauss-Newton)": solver(
            lambda s: tfl.DirectInfluence(s.model, LOSS, s.reg, second_order="gauss_newton")),
        "CG": solver(lambda s: tfl.CgInfluence(s.model, LOSS, s.reg, rtol=1e-6)),
        "LiSSA (1000 it.)": solver(lissa),
        "EK-FAC": solver(lambda s: tfl.EkfacInfluence(s.model, LOSS, s.reg)),
        "K-FAC": solver(lambda s: tfl.KfacInfluence(s.model, LOSS, s.reg)),
        "Arnoldi": solver(lambda s: tfl.ArnoldiInfluence(s.model, LOSS, s.reg, s.rank)),
        "Nystroem (GGN)": solver(lambda s: tfl.NystroemSketchInfluence(s.model, LOSS, s.reg, s.rank,
                                                                       second_order="gauss_newton")),
        "DataInf": solver(lambda s: tfl.InverseHarmonicMeanInfluence(s.model, LOSS, s.reg)),
        "gradient similarity (identity)": gradient_similarity,
        # Projected gradient spaces (torchfluence.projected_space): LoGra's per-layer Kronecker
        # projection (k_out x k_in per layer, clamped to the layer's shape), and the sparse JL
        # transform of the whole gradient (p = 910) with the Fisher of the projected gradients.
        **{f"EK-FAC, Kronecker-projected {ko}x{ki}": solver(
            lambda s, ko=ko, ki=ki: tfl.EkfacInfluence(s.model, LOSS, s.reg,
                                                       projector=tfl.KroneckerProjection(ko, ki)))
           for ko, ki in ((4, 4), (8, 8), (12, 16))},
        "Direct (empirical Fisher, unprojected)": solver(empirical_fisher),
        **{f"Direct (projected Fisher, SJLT k={k})": solver(
            lambda s, k=k: tfl.DirectInfluence(s.model, LOSS, s.reg, projector=sjlt(s, k)))
           for k in (64, 256, 512)},
        **{f"identity, SJLT k={k}": solver(lambda s, k=k: tfl.GradientSimilarity(s.model, LOSS, projector=sjlt(s, k)))
           for k in (64, 256)},
        "random scores": random_scores,
    }


def train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
          weight_decay: float, seed: int) -> nn.Module:
    """Minibatch Adam for a fixed number of epochs; the shuffling is seeded by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            opt.zero_grad()
            LOSS(model(x[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


def jackknife_stderr(scores: Tensor, subsets: Tensor, outputs: Tensor, groups: int = 20) -> float:
    """Standard error of the mean LDS due to the finite number of retrained models.

    Delete-a-group jackknife: the m retrained models are split into `groups`
    interleaved groups, and the mean LDS is recomputed without each group. (A
    bootstrap over models would draw the same model twice; its exact ties bias a
    rank correlation downwards.)
    """
    m = len(subsets)
    groups = min(groups, m // 2)  # each leave-out set then keeps >= m / 2 >= 2 models
    if groups < 2:
        return math.nan
    estimates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a leave-out set can leave a test point constant
        for g in range(groups):
            keep = torch.arange(m) % groups != g
            estimates.append(float(lds(scores, subsets[keep], outputs[keep]).nanmean()))
    values = torch.tensor(estimates, dtype=torch.float64)
    return float(((groups - 1) / groups * (values - values.mean()).square().sum()).sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=100, help="retrained models (random 50%% subsets)")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=12, help="hidden units of the MLP")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--reg", type=float, default=0.01, help="regularization (damping) of every solver")
    parser.add_argument("--rank", type=int, default=10, help="rank of Arnoldi and Nystroem")
    parser.add_argument("--seed", type=int, default=0, help="subset draws and training shuffles")
    parser.add_argument("--checkpoint", help="retraining checkpoint (.safetensors); default: a file in the "
                                             "temp folder named after the settings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; more only slow this small model down on busy cores")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--only", help="comma-separated substrings: score only the rows whose name contains one "
                                       f"(the reference row {REFERENCE!r} is always scored)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x, y, x_test, y_test = digits(args.n_train, args.n_test, dtype=torch.float64)
    hyper = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay, "seed": args.seed}

    def fresh_model() -> nn.Module:
        return mlp(torch.float64, hidden=args.hidden, seed=0)  # the same initial weights every time

    retrain_times: list[float] = []

    def train_fn(indices: Tensor) -> Tensor:
        t0 = time.perf_counter()
        # The same seed for every subset: the shuffle is then no extra source of variation
        # between retrained models (beyond the subset itself), which no score could predict.
        torch.manual_seed(args.seed)
        model = train(fresh_model(), x[indices], y[indices], **hyper)
        with torch.no_grad():
            losses = F.cross_entropy(model(x_test), y_test, reduction="none")  # (n_test,) test losses
        retrain_times.append(time.perf_counter() - t0)
        return losses

    model = train(fresh_model(), x, y, **hyper)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    setting = Setting(model, x, y, x_test, y_test, args.reg, args.batch_size, args.rank)

    # --only picks rows, not retrainings: left out of the key, so every row set shares a checkpoint.
    training = {key: value for key, value in vars(args).items() if key != "only"}
    settings_key = json.dumps({**training, "markdown": None, "checkpoint": None}, sort_keys=True)
    checkpoint = args.checkpoint or str(Path(tempfile.gettempdir()) / (
        "torchfluence_bench_lds_" + hashlib.sha256(settings_key.encode()).hexdigest()[:16] + ".safetensors"))
    print(f"retraining checkpoint: {checkpoint}", flush=True)
    t0 = time.perf_counter()
    subsets, outputs = retrain_subsets(train_fn, len(y), m=args.m, fraction=0.5, seed=args.seed,
                                       checkpoint=checkpoint)
    wall = time.perf_counter() - t0
    retrained = "all from the checkpoint"
    if retrain_times:
        retrained = (f"{len(retrain_times)} retrained in this run in {wall:.0f} s, median "
                     f"{torch.tensor(retrain_times).median():.2f} s each")

    rows = []
    reference = None
    wanted = None if not args.only else [part.strip() for part in args.only.split(",")]
    for name, scorer in scorers().items():
        if wanted is not None and name != REFERENCE and not any(part in name for part in wanted):
            continue
        try:
            t0 = time.perf_counter()
            scores = scorer(setting).double()
            seconds = time.perf_counter() - t0
        except Exception as error:  # report, never hide, a failure
            rows.append([name, f"failed: {type(error).__name__}: {error}"[:80], "-", "-", "-", "-"])
            print(" | ".join(rows[-1]), flush=True)
            continue
        if name == REFERENCE:
            reference = scores
        per_test = lds(scores, subsets, outputs, outputs_are="loss")
        valid = per_test[~torch.isnan(per_test)]
        stderr = float(valid.std() / math.sqrt(len(valid)))
        jackknife = jackknife_stderr(scores, subsets, outputs)
        diff = "-" if reference is None else f"{float((scores - reference).norm() / reference.norm()):.1e}"
        rows.append([name, f"{float(valid.mean()):.3f}", f"{stderr:.3f}", f"{jackknife:.3f}",
                     diff, f"{seconds:.2f}"])
        print(" | ".join(rows[-1]), flush=True)

    env = environment(torch.device("cpu"))
    p = sum(q.numel() for q in model.parameters())
    about = (f"digits MLP 64-{args.hidden}-10 ({p} parameters, float64), n_train {len(y)}, "
             f"n_test {len(y_test)}, test accuracy {accuracy:.3f}; {args.m} retrainings on random 50% "
             f"subsets, same initial weights, Adam lr {args.lr}, weight decay {args.weight_decay}, "
             f"{args.epochs} epochs of batches of {args.batch_size}, shuffle seed {args.seed} ({retrained}); "
             f"outputs = test cross-entropy losses; regularization {args.reg}, rank {args.rank}; "
             "rel. diff = ||S - S_direct|| / ||S_direct||")
    print(env)
    print(about)
    text = print_table(["scores", "mean LDS", "s.e. (test points)", f"s.e. (m={args.m} models)",
                        "rel. diff vs Direct", "fit + score s"], rows)
    if args.markdown:
        Path(args.markdown).write_text(env + "\n\n" + about + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
