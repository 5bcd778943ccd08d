"""Linear datamodeling score (LDS) of every solver, and of other libraries' methods, on digits.

A small model (the digits MLP or CNN of ``tests/digits.py``) is trained on the
full digits training set; each method scores the test points against the
training points. The same model (same initial weights, same seed, same number
of epochs) is then retrained on m random halves of the training set, and
``torchfluence.evaluation.lds`` compares, per test point, the ranking of the m
retrained models' test losses with the ranking the summed scores predict. Every
method is scored against the SAME subsets and the SAME retrained models. The
table gives each method's mean LDS over the test points, its standard error over
the test points, its standard error due to the finite number m of retrained
models (delete-a-group jackknife), and the wall seconds of that method (fit +
scores) in this run, each method timed once, one after another.

The rows are torchfluence's solvers, EK-FAC and K-FAC under each Fisher
(``fisher="true"``, the sampled-label default, over several seeds and with as
many draws as classes; ``"exact"``; ``"empirical"``), and the peers of
``_lds_peers.py``: kronfluence 1.0.1 (EK-FAC
and K-FAC), TRAK (traker 0.3.2, CPU projector) and dattri 0.3.0 (IF with CG,
TracIn, TRAK). A peer that is not installed or fails keeps its row, with the
error in place of the numbers. TRAK and dattri's TRAK use an ensemble of models
trained on the full set with the same recipe and seeds 0..K-1 (seed 0 is the
model every other row uses); their training time is the "extra training s"
column. TracIn uses checkpoints saved during the one training run.

The retraining is checkpointed (``retrain_subsets(checkpoint=...)``): an
interrupted run picks up where it stopped, and a finished one is reused. The
checkpoint file name encodes every training setting, so a run with other
settings never reuses it.

    python benchmarks/bench_lds.py [--workloads mlp:500,cnn:200] [--n-train 1000] [--epochs 50]
                                   [--only SUBSTRINGS] [--markdown FILE]

Rows are the entries of ``scorers()``: a name and a function of the trained
setting returning (n_test, n_train) scores with torchfluence's sign
(positive = helpful). Add a method by adding an entry.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# dattri draws a progress bar per batch; tqdm reads this when first imported (torch imports it). The
# retraining prints its own progress.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
import _lds_peers as peers  # noqa: E402
import torchfluence as tfl  # noqa: E402
from _timing import environment, print_table  # noqa: E402
from torchfluence.evaluation import lds, retrain_subsets  # noqa: E402

from tests.digits import cnn, digits, exact_hessian, mlp  # noqa: E402

LOSS = F.cross_entropy
REFERENCE = "Direct (Hessian)"  # the row the others' relative difference is measured against
FISHER_SEEDS = (0, 1, 2, 3, 4)  # fisher="true" (sampled labels) rows of EK-FAC and K-FAC
FISHER_DRAWS = 10  # fisher_samples of the many-draws rows: the classes of digits, fisher="exact"'s passes
TRAK_ENSEMBLE = 5  # models in the TRAK ensembles (besides the 1-model rows)
TRACIN_EPOCHS = 5  # TracIn checkpoints, evenly spaced over the training run


@dataclass
class Setting:
    """The trained model and its data; what every scoring function receives."""

    model: nn.Module
    x: Tensor  # (n_train, 64) for the MLP, (n_train, 1, 8, 8) for the CNN
    y: Tensor  # (n_train,)
    x_test: Tensor
    y_test: Tensor  # (n_test,)
    reg: float
    batch_size: int
    rank: int
    # train_full(seed, save_every) -> (model, checkpoints): the training recipe on the full set, initial
    # weights and shuffle seeded by seed; a state dict every save_every epochs when save_every > 0.
    train_full: Callable[[int, int], tuple[nn.Module, list[dict]]] | None = None
    lr: float = 0.0
    epochs: int = 0
    extra_seconds: float = 0.0  # training time of the extra models the current row uses
    fresh_seconds: float = 0.0  # the part of it spent in the current row (the rest was cached)
    _ensemble: dict[int, tuple[nn.Module, float]] = field(default_factory=dict)

    @property
    def loader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y),
                                           batch_size=self.batch_size)

    def ensemble(self, k: int) -> list[nn.Module]:
        """The model and k - 1 more, trained with seeds 1..k-1 (once; charged to each row using them)."""
        models = [self.model]
        for seed in range(1, k):
            if seed not in self._ensemble:
                t0 = time.perf_counter()
                model, _ = self.train_full(seed, 0)
                self._ensemble[seed] = (model, time.perf_counter() - t0)
                self.fresh_seconds += self._ensemble[seed][1]
            model, seconds = self._ensemble[seed]
            models.append(model)
            self.extra_seconds += seconds
        return models

    def trajectory(self) -> tuple[list[dict], list[float]]:
        """TracIn's checkpoints: state dicts saved every epochs / TRACIN_EPOCHS epochs of the training
        run that gave `model` (the same seed, so the last one is `model`), and the learning rate of each."""
        _, checkpoints = self.train_full(0, max(1, self.epochs // TRACIN_EPOCHS))
        return checkpoints, [self.lr] * len(checkpoints)


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

    def kronecker(cls, **options) -> Scorer:
        return solver(lambda s: cls(s.model, LOSS, s.reg, **options))

    fisher_rows = {}
    for label, cls in (("EK-FAC", tfl.EkfacInfluence), ("K-FAC", tfl.KfacInfluence)):
        # "EK-FAC" / "K-FAC" are the defaults (fisher="true", seed 0); the seeds after 0 and the
        # other Fishers follow.
        fisher_rows[label] = kronecker(cls)
        for seed in FISHER_SEEDS[1:]:
            fisher_rows[f"{label}, fisher='true' seed {seed}"] = kronecker(cls, fisher="true", seed=seed)
        for fisher in ("exact", "empirical"):
            fisher_rows[f"{label}, fisher='{fisher}'"] = kronecker(cls, fisher=fisher)
        # As many backward passes as fisher='exact' (one per class): the noise at the same cost.
        fisher_rows[f"{label}, fisher='true' {FISHER_DRAWS} draws"] = kronecker(cls, fisher="true",
                                                                               fisher_samples=FISHER_DRAWS)

    # 16-bit factor operands need a float32 model (the digits models are float64): the
    # float32 row is their reference, both with the exact Fisher so that only precision differs.
    def float32_ekfac(s: Setting, **options):
        return tfl.EkfacInfluence(copy.deepcopy(s.model).float(), LOSS, s.reg, fisher="exact", **options)

    precision_rows = {
        "EK-FAC, fisher='exact', float32 model": solver(float32_ekfac),
        "EK-FAC, fisher='exact', bf16 factors + captures": solver(
            lambda s: float32_ekfac(s, factor_dtype=torch.bfloat16, capture_dtype=torch.bfloat16)),
    }

    return {
        "Direct (Hessian)": solver(lambda s: tfl.DirectInfluence(s.model, LOSS, s.reg)),
        "Direct (Gauss-Newton)": solver(
            lambda s: tfl.DirectInfluence(s.model, LOSS, s.reg, second_order="gauss_newton")),
        "CG": solver(lambda s: tfl.CgInfluence(s.model, LOSS, s.reg, rtol=1e-6)),
        # dattri's IF row runs 10 CG steps per query, one query at a time: the same truncation here.
        "CG (10 it., block=False)": solver(
            lambda s: tfl.CgInfluence(s.model, LOSS, s.reg, maxiter=10, block=False)),
        "LiSSA (1000 it.)": solver(lissa),
        **fisher_rows,
        **precision_rows,
        "Arnoldi": solver(lambda s: tfl.ArnoldiInfluence(s.model, LOSS, s.reg, s.rank)),
        "Nystroem (GGN)": solver(lambda s: tfl.NystroemSketchInfluence(s.model, LOSS, s.reg, s.rank,
                                                                       second_order="gauss_newton")),
        "DataInf": solver(lambda s: tfl.InverseHarmonicMeanInfluence(s.model, LOSS, s.reg)),
        "gradient similarity (identity)": gradient_similarity,
        # Projected gradient spaces (torchfluence.projected_space): LoGra's per-layer Kronecker
        # projection (k_out x k_in per layer, clamped to the layer's shape), and the sparse JL
        # transform of the whole gradient with the Fisher of the projected gradients.
        **{f"EK-FAC, Kronecker-projected {ko}x{ki}": solver(
            lambda s, ko=ko, ki=ki: tfl.EkfacInfluence(s.model, LOSS, s.reg,
                                                       projector=tfl.KroneckerProjection(ko, ki)))
           for ko, ki in ((4, 4), (8, 8), (12, 16))},
        "Direct (empirical Fisher, unprojected)": solver(empirical_fisher),
        **{f"Direct (projected Fisher, SJLT k={k})": solver(
            lambda s, k=k: tfl.DirectInfluence(s.model, LOSS, s.reg, projector=sjlt(s, k)))
           for k in (64, 256, 512)},
        **{f"identity, SJLT k={k}": solver(
            lambda s, k=k: tfl.GradientSimilarity(s.model, LOSS, projector=sjlt(s, k)))
           for k in (64, 256)},
        # Other libraries (benchmarks/_lds_peers.py has each one's configuration).
        "kronfluence 1.0.1 EK-FAC": peers.kronfluence("ekfac"),
        "kronfluence 1.0.1 K-FAC": peers.kronfluence("kfac"),
        "TRAK (traker 0.3.2), 1 model, proj 512": peers.trak(1, 512),
        f"TRAK (traker 0.3.2), {TRAK_ENSEMBLE} models, proj 512": peers.trak(TRAK_ENSEMBLE, 512),
        f"TRAK (traker 0.3.2), {TRAK_ENSEMBLE} models, proj 2048 (default)": peers.trak(TRAK_ENSEMBLE),
        "dattri 0.3.0 IF (CG, 10 it.)": peers.dattri_if_cg(10),
        "dattri 0.3.0 IF (CG, 100 it.)": peers.dattri_if_cg(100),
        f"dattri 0.3.0 TracIn ({TRACIN_EPOCHS} checkpoints)": peers.dattri_tracin(),
        "dattri 0.3.0 TRAK, 1 model": peers.dattri_trak(1),
        f"dattri 0.3.0 TRAK, {TRAK_ENSEMBLE} models": peers.dattri_trak(TRAK_ENSEMBLE),
        "random scores": random_scores,
    }


def train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
          weight_decay: float, seed: int, save_every: int = 0) -> tuple[nn.Module, list[dict]]:
    """Minibatch Adam for a fixed number of epochs; the shuffling is seeded by `seed`.

    Returns the model and, with save_every > 0, a copy of its state dict after every
    save_every-th epoch (the last one is the returned model's)."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    checkpoints = []
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            opt.zero_grad()
            LOSS(model(x[batch]), y[batch]).backward()
            opt.step()
        if save_every > 0 and (epoch + 1) % save_every == 0:
            checkpoints.append(copy.deepcopy(model.state_dict()))
    return model.eval(), checkpoints


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


def parse_workloads(text: str, default_m: int) -> list[tuple[str, int]]:
    """'mlp:500,cnn:200' -> [('mlp', 500), ('cnn', 200)]; a workload without ':m' gets default_m."""
    out = []
    for part in text.split(","):
        name, _, m = part.strip().partition(":")
        if name not in ("mlp", "cnn"):
            raise SystemExit(f"--workloads: unknown workload {name!r} (mlp or cnn)")
        out.append((name, int(m) if m else default_m))
    return out


@dataclass
class Row:
    name: str
    per_test: Tensor | None = None  # (n_test,) LDS per test point, NaN where undefined
    mean: float = math.nan
    stderr: float = math.nan
    jackknife: float = math.nan
    diff: str = "-"
    paired: str = "-"  # mean over test points of (this row's LDS - the reference row's), and its s.e.
    seconds: float = math.nan
    extra: float = 0.0
    error: str = ""


def run_workload(args, workload: str, m: int) -> tuple[str, list[Row], str]:
    """Trains, retrains (checkpointed) and scores every selected row on one workload."""
    image = workload == "cnn"
    x, y, x_test, y_test = digits(args.n_train, args.n_test, dtype=torch.float64, image=image)
    hyper = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay}

    def fresh_model(seed: int = 0) -> nn.Module:  # seed 0: the same initial weights every time
        return cnn(torch.float64, seed=seed) if image else mlp(torch.float64, hidden=args.hidden, seed=seed)

    retrain_times: list[float] = []

    def train_fn(indices: Tensor) -> Tensor:
        t0 = time.perf_counter()
        # The same seed for every subset: the shuffle is then no extra source of variation
        # between retrained models (beyond the subset itself), which no score could predict.
        torch.manual_seed(args.seed)
        model, _ = train(fresh_model(), x[indices], y[indices], seed=args.seed, **hyper)
        with torch.no_grad():
            losses = F.cross_entropy(model(x_test), y_test, reduction="none")  # (n_test,) test losses
        retrain_times.append(time.perf_counter() - t0)
        if len(retrain_times) % max(1, m // 10) == 0:
            print(f"[{workload}] retrained {len(retrain_times)} models in this run, "
                  f"{sum(retrain_times):.0f} s", flush=True)
        return losses

    def train_full(seed: int, save_every: int) -> tuple[nn.Module, list[dict]]:
        # seed 0 reproduces `model` below exactly; other seeds change the initial weights and shuffle.
        torch.manual_seed(args.seed + seed)
        return train(fresh_model(seed), x, y, seed=args.seed + seed, save_every=save_every, **hyper)

    model, _ = train_full(0, 0)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    setting = Setting(model, x, y, x_test, y_test, args.reg, args.batch_size, args.rank,
                      train_full=train_full, lr=args.lr, epochs=args.epochs)

    # Only what changes the retrained models goes into the checkpoint's name.
    training = {"workload": workload, "m": m, "n_train": args.n_train, "n_test": args.n_test,
                "hidden": args.hidden if not image else None, "seed": args.seed, **hyper}
    key = hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / f"torchfluence_bench_lds_{workload}_m{m}_{key}.safetensors"
    print(f"[{workload}] retraining checkpoint: {checkpoint}", flush=True)
    t0 = time.perf_counter()
    subsets, outputs = retrain_subsets(train_fn, len(y), m=m, fraction=0.5, seed=args.seed,
                                       checkpoint=str(checkpoint), progress=False)
    wall = time.perf_counter() - t0
    retrained = "all from the checkpoint"
    if retrain_times:
        retrained = (f"{len(retrain_times)} retrained in this run in {wall:.0f} s, median "
                     f"{torch.tensor(retrain_times).median():.2f} s each")

    rows: list[Row] = []
    reference = reference_lds = None
    wanted = None if not args.only else [part.strip() for part in args.only.split(",")]
    for name, scorer in scorers().items():
        if wanted is not None and name != REFERENCE and not any(part in name for part in wanted):
            continue
        setting.extra_seconds = setting.fresh_seconds = 0.0
        torch.manual_seed(0)
        try:
            t0 = time.perf_counter()
            scores = scorer(setting)
            seconds = time.perf_counter() - t0 - setting.fresh_seconds
            scores = torch.as_tensor(scores).double()
            if scores.shape != (len(y_test), len(y)):
                raise ValueError(f"scores of shape {tuple(scores.shape)}, expected {(len(y_test), len(y))}")
            if not torch.isfinite(scores).all():
                raise ValueError(f"{int((~torch.isfinite(scores)).sum())} non-finite scores")
        except Exception as error:  # report, never hide, a failure
            message = " ".join(f"{type(error).__name__}: {error}".split())
            rows.append(Row(name, error=message[:300]))
            print(f"[{workload}] {name} | could not run: {message[:300]}", flush=True)
            continue
        per_test = lds(scores, subsets, outputs, outputs_are="loss")
        if name == REFERENCE:
            reference, reference_lds = scores, per_test
        valid = per_test[~torch.isnan(per_test)]
        row = Row(name, per_test, float(valid.mean()), float(valid.std() / math.sqrt(len(valid))),
                  jackknife_stderr(scores, subsets, outputs), seconds=seconds, extra=setting.extra_seconds)
        if reference is not None:
            row.diff = f"{float((scores - reference).norm() / reference.norm()):.1e}"
            delta = per_test - reference_lds
            delta = delta[~torch.isnan(delta)]
            row.paired = f"{float(delta.mean()):+.3f} ± {float(delta.std() / math.sqrt(len(delta))):.3f}"
        rows.append(row)
        print(f"[{workload}] {name} | {row.mean:.3f} ± {row.stderr:.3f} | {row.jackknife:.3f} | "
              f"{row.paired} | {row.diff} | {seconds:.2f} s | extra {row.extra:.1f} s", flush=True)

    p = sum(q.numel() for q in model.parameters())
    shape = "CNN conv 1-4 3x3, tanh, max-pool, linear 64-10" if image else f"MLP 64-{args.hidden}-10"
    about = (f"**{workload}**: digits {shape} ({p} parameters, float64), n_train {len(y)}, "
             f"n_test {len(y_test)}, test accuracy {accuracy:.3f}; m = {m} retrainings on random 50% "
             f"subsets, same initial weights, Adam lr {args.lr}, weight decay {args.weight_decay}, "
             f"{args.epochs} epochs of batches of {args.batch_size}, shuffle seed {args.seed} ({retrained}); "
             f"outputs = test cross-entropy losses; regularization (damping) {args.reg}, rank {args.rank}")
    return workload, rows, about


def fisher_summary(workload: str, m: int, rows: list[Row]) -> list[list[str]]:
    """EK-FAC and K-FAC: the sampled-label Fisher's LDS over seeds against the exact and empirical Fishers."""
    by_name = {r.name: r for r in rows if r.per_test is not None}
    out = []
    for label in ("EK-FAC", "K-FAC"):
        names = [label] + [f"{label}, fisher='true' seed {s}" for s in FISHER_SEEDS[1:]]
        seeds = [by_name[n] for n in names if n in by_name]
        exact = by_name.get(f"{label}, fisher='exact'")
        empirical = by_name.get(f"{label}, fisher='empirical'")
        draws = by_name.get(f"{label}, fisher='true' {FISHER_DRAWS} draws")
        if len(seeds) < 2 or exact is None:
            continue
        means = [r.mean for r in seeds]
        # Paired over test points: exact - (the seeds' average), and its s.e. over test points.
        true_avg = torch.stack([r.per_test for r in seeds]).mean(0)
        paired = exact.per_test - true_avg
        paired = paired[~torch.isnan(paired)]
        out.append([
            workload, str(m), label, str(len(seeds)),
            f"{statistics.mean(means):.3f}", f"{statistics.stdev(means):.3f}",
            f"{min(means):.3f} .. {max(means):.3f}",
            f"{statistics.mean(r.seconds for r in seeds):.2f}",
            f"{exact.mean:.3f}", f"{exact.seconds:.2f}",
            f"{float(paired.mean()):+.3f} ± {float(paired.std() / math.sqrt(len(paired))):.3f}",
            "-" if draws is None else f"{draws.mean:.3f}",
            "-" if draws is None else f"{draws.seconds:.2f}",
            "-" if empirical is None else f"{empirical.mean:.3f}",
            "-" if empirical is None else f"{empirical.seconds:.2f}",
        ])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mlp",
                        help="comma-separated workload[:m], workload mlp or cnn, e.g. mlp:500,cnn:200 "
                             "(m defaults to --m)")
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
    parser.add_argument("--checkpoint-dir", help="folder of the retraining checkpoints (.safetensors, one "
                                                 "per workload, named after its settings); default: the temp "
                                                 "folder")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; more only slow this small model down on busy cores")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--only", help="comma-separated substrings: score only the rows whose name contains "
                                       f"one (the reference row {REFERENCE!r} is always scored)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    workloads = parse_workloads(args.workloads, args.m)
    results = [(m, *run_workload(args, workload, m)) for workload, m in workloads]

    env = environment(torch.device("cpu"))
    print(env)
    headers = ["workload", "m", "scores", "mean LDS ± s.e. (test points)", "s.e. (models)",
               "LDS - Direct's (paired)", "rel. diff vs Direct", "fit + score s", "extra training s"]
    table = []
    for m, workload, rows, about in results:
        print(about)
        for r in rows:
            if r.error:
                table.append([workload, str(m), r.name, f"could not run: {r.error}", "-", "-", "-", "-", "-"])
            else:
                table.append([workload, str(m), r.name, f"{r.mean:.3f} ± {r.stderr:.3f}",
                              f"{r.jackknife:.3f}", r.paired, r.diff, f"{r.seconds:.2f}",
                              f"{r.extra:.1f}" if r.extra else "-"])
    text = print_table(headers, table)
    fisher_rows = [row for m, workload, rows, _ in results for row in fisher_summary(workload, m, rows)]
    fisher_text = ""
    if fisher_rows:
        print("\nSampled-label Fisher (fisher='true', one row per seed above) against fisher='exact', "
              "more draws and 'empirical':")
        fisher_text = print_table(
            ["workload", "m", "solver", "seeds", "true: mean LDS", "true: s.d. over seeds", "true: range",
             "true: s", "exact: LDS", "exact: s", "exact - true (paired, s.e.)",
             f"true, {FISHER_DRAWS} draws: LDS", f"true, {FISHER_DRAWS} draws: s",
             "empirical: LDS", "empirical: s"],
            fisher_rows)
    if args.markdown:
        abouts = "\n\n".join(about for _, _, _, about in results)
        Path(args.markdown).write_text(f"{env}\n\n{abouts}\n\n{text}\n\n{fisher_text}\n")


if __name__ == "__main__":
    main()
