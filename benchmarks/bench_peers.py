"""torchfluence against pyDVL, kronfluence and pytorch-influence-functions, each in its best configuration.

Every row runs both libraries on the same model and data in the same process.
Correctness comes first (untimed; it doubles as the warm-up): each side's
answer is compared with an exact float64 oracle where one is affordable, and
with the other side. Then the two are timed alternately (A, B, A, B, ...) and
the median of each is reported, so that load on the machine hits both alike.
The ratio is peer time / torchfluence time: above 1 means torchfluence is faster.

Rows (``--only`` takes row names or prefixes, e.g. ``--only cg ptif``):

  cg-mlp, cg-cnn, cg-mlp-reg1e-2
      pyDVL 0.10 ``CgInfluence(solve_simultaneously=True)`` (its block CG, default
      rtol/atol) against ``tfl.CgInfluence`` (block CG) on the full test x train
      influence matrix of a digits MLP / CNN. torchfluence's rtol is the loosest of
      1e-2 ... 1e-7 whose error against the oracle is no larger than pyDVL's (or,
      when both are below 1e-5, float32 rounding, within that).
  direct-mlp, direct-cnn
      pyDVL ``DirectInfluence`` against ``tfl.DirectInfluence``: fit + full matrix.
  ekfac-100k, ekfac-1m
      kronfluence 1.0.1 (default ``FactorArguments``: EK-FAC; default
      ``ScoreArguments`` except the damping, set to the same absolute value as
      torchfluence's regularization) against ``tfl.EkfacInfluence`` on a
      ResNet-9-shaped network (frozen BatchNorm) with CIFAR-shaped random data.
      Fit and scoring are timed separately; fidelity is the Pearson correlation
      of the two score matrices (no exact oracle at this size).
  ptif
      pytorch-influence-functions 0.1.1 ``calc_img_wise`` against
      ``torchfluence.ptif.calc_img_wise`` with the same config on a small CIFAR-shaped
      CNN; the original on a few test points (it recomputes every training
      gradient per test point), torchfluence on the default 10; time per test point.
      Recursion depth: the training set size, or --ptif-depth.

    python benchmarks/bench_peers.py [--quick] [--only NAME ...] [--repeats N] [--threads N] [--markdown FILE] [--ptif-depth N]

Timings are only comparable on an otherwise idle machine: the load average is
printed at the start and the end. On a loaded machine, multi-threaded small
kernels stall whenever a thread is descheduled; ``--threads 1`` avoids that.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import torchfluence as tfl  # noqa: E402
import torchfluence.ptif as tfl_ptif  # noqa: E402
from _resnet9 import cifar_like, kronfluence_pairwise, trained_resnet9  # noqa: E402
from _timing import environment, print_table  # noqa: E402

ROWS = ("cg-mlp", "cg-cnn", "cg-mlp-reg1e-2", "direct-mlp", "direct-cnn", "ekfac-100k", "ekfac-1m", "ptif")
RTOL_LADDER = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
# Relative errors below this are float32 rounding: the exact float32 solves (the direct rows)
# land at ~5e-6. Two errors both under it count as equal when torchfluence's rtol is chosen.
FLOAT32_FLOOR = 1e-5
WEIGHT_DECAY = 1e-3  # below every regularization / damp used on the trained models (see train_to_minimum)
EKFAC_REG = 1e-3  # of the order of the EK-FAC eigenvalues of these networks (1e-4 ... 3e-2)
PTIF_DAMP, PTIF_SCALE, PTIF_BATCH = 0.01, 25.0, 32  # the original's s_test defaults; its examples' batch


@dataclass(frozen=True)
class Sizes:
    digits_train: int
    digits_test: int
    cnn_channels: int
    epochs: int
    lbfgs_iterations: int
    ekfac_widths: tuple[int, int]  # ResNet-9 base width: 8 -> ~100k parameters, 25 -> ~1M
    ekfac_train: tuple[int, int]
    ekfac_queries: tuple[int, int]
    ekfac_batch: int
    ptif_train: int
    ptif_epochs: int
    ptif_lbfgs_iterations: int
    ptif_original_tests: int
    repeats: int
    ptif_depth: int | None = None  # LiSSA recursion depth; None: the training set size


FULL = Sizes(
    digits_train=1437,
    digits_test=360,
    cnn_channels=4,
    epochs=5,
    lbfgs_iterations=500,
    ekfac_widths=(8, 25),
    ekfac_train=(2000, 500),
    ekfac_queries=(100, 50),
    ekfac_batch=128,
    ptif_train=5000,
    ptif_epochs=20,
    ptif_lbfgs_iterations=200,
    ptif_original_tests=2,
    repeats=3,
)
QUICK = Sizes(
    digits_train=128,
    digits_test=16,
    cnn_channels=2,
    epochs=3,
    lbfgs_iterations=100,
    ekfac_widths=(2, 4),
    ekfac_train=(64, 64),
    ekfac_queries=(8, 8),
    ekfac_batch=32,
    ptif_train=96,
    ptif_epochs=20,
    ptif_lbfgs_iterations=200,
    ptif_original_tests=1,
    repeats=3,
)


@dataclass
class Result:
    """One line of the table."""

    row: str
    stage: str
    peer_s: float | None = None
    ours_s: float | None = None
    peer_quality: str = "-"
    ours_quality: str = "-"
    agreement: str = "-"
    runs: int = 0
    note: str = ""

    def cells(self) -> list[str]:
        def seconds(s: float | None) -> str:
            return "-" if s is None else f"{s:.3f}" if s < 10 else f"{s:.1f}"

        ratio = f"{self.peer_s / self.ours_s:.1f}x" if self.peer_s and self.ours_s else "-"
        note = " ".join(self.note.split()).replace("|", "/")  # one table cell: one line, no pipes
        note = note if len(note) <= 160 else note[:157] + "..."
        return [
            self.row,
            self.stage,
            seconds(self.peer_s),
            seconds(self.ours_s),
            ratio,
            self.peer_quality,
            self.ours_quality,
            self.agreement,
            str(self.runs),
            note,
        ]


HEADERS = [
    "row",
    "stage",
    "peer s",
    "torchfluence s",
    "peer / torchfluence",
    "peer quality",
    "torchfluence quality",
    "agreement (Pearson)",
    "timed pairs",
    "note",
]


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    configs: dict[str, str] = field(default_factory=dict)
    failed: bool = False

    def add(self, result: Result) -> None:
        self.results.append(result)
        print(" | ".join(result.cells()), flush=True)


class CorrectnessError(AssertionError):
    """torchfluence's answer failed its check: the row is not timed."""


# -- measurement ------------------------------------------------------------------------------------


def interleaved(runs: dict[str, Callable[[], dict[str, float]]], repeats: int) -> dict[str, dict[str, float]]:
    """Median stage times of each run over `repeats` rounds, the runs alternating within a round.

    Each run returns its own stage times (e.g. ``{"fit": s, "scores": s}``), so a
    library's stages are timed inside one call, as a user would run them.
    """
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            gc.collect()
            samples[name].append(run())
    return {
        name: {stage: statistics.median(s[stage] for s in got) for stage in got[0]}
        for name, got in samples.items()
    }


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    began = time.perf_counter()
    out = fn()
    return time.perf_counter() - began, out


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def relative_error(got: Tensor, exact: Tensor) -> float:
    return float((got.double() - exact).norm() / exact.norm())


@contextlib.contextmanager
def quiet():
    """Silences progress bars and prints (both sides alike): the terminal is not what is measured."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- peers ------------------------------------------------------------------------------------------


def _import_peers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyDVL's deprecation helpers warn at import under newer pyDeprecate
        try:
            import pydvl.influence.torch as pydvl_influence
        except ImportError:
            pydvl_influence = None
        try:
            import kronfluence
        except ImportError:
            kronfluence = None
        try:
            import pytorch_influence_functions as original_ptif
        except ImportError:
            original_ptif = None
    return pydvl_influence, kronfluence, original_ptif


PYDVL, KRONFLUENCE, ORIGINAL_PTIF = _import_peers()


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@contextlib.contextmanager
def pydvl_cg_log():
    """Collects pyDVL's CG log lines (the iteration count is only logged, at DEBUG level)."""
    logger = logging.getLogger("pydvl.influence.torch.operator")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, level, propagate = Collect(logging.DEBUG), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def pydvl_iterations(lines: list[str], caught: list[warnings.WarningMessage]) -> str:
    for line in lines:
        if line.startswith("Terminated block cg after"):
            return line.split()[4]
    if any("Reached max number of iterations" in str(w.message) for w in caught):
        return "maxiter (not converged)"
    return "?"


# -- digits models (CG and direct rows) -------------------------------------------------------------


@functools.cache
def digits(sizes: Sizes, image: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = x.view(-1, 1, 8, 8) if image else x
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437][: sizes.digits_train], order[1437:][: sizes.digits_test]
    return x[train], y[train], x[test], y[test]


@functools.cache
def train_digits(sizes: Sizes, kind: str) -> nn.Module:
    """A digits MLP (64-32-10) or CNN, trained a few epochs, then polished to a minimum.

    Adam alone leaves the Hessian of the training loss with negative eigenvalues
    far larger than any regularization used here, and CG needs H + lambda I
    positive definite. Full-batch L-BFGS on the loss + WEIGHT_DECAY/2 |theta|^2
    ends near that objective's minimum, where H >= -WEIGHT_DECAY I, so
    H + lambda I is positive definite for lambda > WEIGHT_DECAY (the oracle checks it).
    """
    x, y, _, _ = digits(sizes, image=kind == "cnn")
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    else:
        c = sizes.cnn_channels
        model = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * c, 10)
        )
    return train_to_minimum(model, x, y, sizes.epochs, sizes.lbfgs_iterations, lr=1e-2)


def train_to_minimum(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int, lbfgs_iterations: int, lr: float
) -> nn.Module:
    """Adam epochs (batch 64), then full-batch L-BFGS on the loss + WEIGHT_DECAY/2 |theta|^2.

    At that objective's minimum the Hessian of the loss is >= -WEIGHT_DECAY I, so
    H + lambda I is positive definite for every lambda > WEIGHT_DECAY used here.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    lbfgs = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=lbfgs_iterations,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def objective():
        lbfgs.zero_grad()
        value = F.cross_entropy(model(x), y) + WEIGHT_DECAY / 2 * sum(
            p.square().sum() for p in model.parameters()
        )
        value.backward()
        return value

    lbfgs.step(objective)
    return model.eval()


@dataclass
class Oracle:
    scores: Tensor  # (n_test, n_train) float64
    curvature: Tensor  # (p, p) float64 H, without regularization
    test_grads: Tensor  # (n_test, p) float64
    smallest_eigenvalue: float

    def max_residual(self, factors: Tensor, reg: float) -> float:
        """max over test points of ||(H + reg I) f - g|| / ||g||, in float64."""
        f = factors.double()
        r = f @ self.curvature + reg * f - self.test_grads
        return float((r.norm(dim=1) / self.test_grads.norm(dim=1)).max())


@functools.cache
def oracle(sizes: Sizes, kind: str, reg: float) -> Oracle:
    """Exact influences: tfl.DirectInfluence on a float64 copy (explicit H, eigendecomposition)."""
    x, y, xt, yt = digits(sizes, image=kind == "cnn")
    m64 = copy.deepcopy(train_digits(sizes, kind)).double()
    exact = tfl.DirectInfluence(m64, F.cross_entropy, reg, dtype=torch.float64).fit((x.double(), y))
    return Oracle(
        exact.influences(xt.double(), yt, x.double(), y),
        exact.curvature,
        exact.grads(xt.double(), yt),
        float(exact.eigenvalues[0]),
    )


def digits_loader(x: Tensor, y: Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=256)  # the same loader for both libraries


def row_cg(name: str, kind: str, reg: float, sizes: Sizes, report: Report) -> None:
    x, y, xt, yt = digits(sizes, image=kind == "cnn")
    model = train_digits(sizes, kind)
    loader = digits_loader(x, y)
    exact = oracle(sizes, kind, reg)
    p = sum(q.numel() for q in model.parameters())
    report.configs[name] = (
        f"digits {kind.upper()} ({p} parameters), {len(xt)} x {len(x)} matrix, regularization {reg:g}, "
        f"batch 256; pyDVL CgInfluence(regularization={reg:g}, solve_simultaneously=True, maxiter={p}) "
        f"with its default rtol=1e-4, atol=1e-6; torchfluence CgInfluence(block=True, rtol from "
        f"{RTOL_LADDER}). Smallest eigenvalue of H: {exact.smallest_eigenvalue:.2e}"
    )
    if PYDVL is None:
        report.add(Result(name, "fit + matrix", note="pyDVL not installed"))
        return

    def peer():
        im = PYDVL.CgInfluence(model, F.cross_entropy, reg, solve_simultaneously=True, maxiter=p)
        im.fit(loader)
        factors = im.influence_factors(xt, yt)
        # mode stays at its default, InfluenceMode.Up: pyDVL 0.10's influences_from_factors
        # takes the string "up" for the perturbation mode.
        return factors, im.influences_from_factors(factors, x, y)

    # Correctness (and warm-up): pyDVL first, to know the error torchfluence must match.
    try:
        with pydvl_cg_log() as lines, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peer_factors, peer_scores = peer()
    except Exception as error:  # a peer failure is reported, never hidden
        report.add(Result(name, "fit + matrix", note=f"pyDVL failed: {type(error).__name__}: {error}"))
        return
    peer_error = relative_error(peer_scores, exact.scores)
    peer_quality = (
        f"err {peer_error:.1e}, res {exact.max_residual(peer_factors, reg):.1e}, "
        f"{pydvl_iterations(lines, caught)} it"
    )

    chosen = None
    for rtol in RTOL_LADDER:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a non-converged rung is simply not chosen
            im = tfl.CgInfluence(model, F.cross_entropy, reg, rtol=rtol).fit(loader)
            factors = im.influence_factors(xt, yt)
            scores = im.influences_from_factors(factors, x, y)
        error = relative_error(scores, exact.scores)
        chosen = (rtol, error, factors, scores, int(im.last_solve_info.iterations.max()))
        if error <= max(peer_error, FLOAT32_FLOOR):
            break
    rtol, error, factors, scores, iterations = chosen
    ours_quality = (
        f"err {error:.1e}, res {exact.max_residual(factors, reg):.1e}, {iterations} it, rtol {rtol:g}"
    )
    agreement = f"{pearson(peer_scores, scores):.6f}"
    note = "" if error <= max(peer_error, FLOAT32_FLOOR) else "torchfluence did not reach pyDVL's error"
    if error > 1e-2:
        report.failed = True
        report.add(
            Result(
                name,
                "fit + matrix",
                None,
                None,
                peer_quality,
                ours_quality,
                agreement,
                note=f"FAILED: torchfluence error {error:.1e} > 1e-2; not timed",
            )
        )
        return

    def run_peer():
        t, _ = timed(
            lambda: (
                PYDVL.CgInfluence(model, F.cross_entropy, reg, solve_simultaneously=True, maxiter=p)
                .fit(loader)
                .influences(xt, yt, x, y)
            )
        )
        return {"total": t}

    def run_ours():
        t, _ = timed(
            lambda: (
                tfl.CgInfluence(model, F.cross_entropy, reg, rtol=rtol).fit(loader).influences(xt, yt, x, y)
            )
        )
        return {"total": t}

    with quiet():
        medians = interleaved({"peer": run_peer, "ours": run_ours}, sizes.repeats)
    report.add(
        Result(
            name,
            "fit + matrix",
            medians["peer"]["total"],
            medians["ours"]["total"],
            peer_quality,
            ours_quality,
            agreement,
            sizes.repeats,
            note,
        )
    )


def row_direct(name: str, kind: str, reg: float, sizes: Sizes, report: Report) -> None:
    x, y, xt, yt = digits(sizes, image=kind == "cnn")
    model = train_digits(sizes, kind)
    loader = digits_loader(x, y)
    exact = oracle(sizes, kind, reg)
    p = sum(q.numel() for q in model.parameters())
    report.configs[name] = (
        f"digits {kind.upper()} ({p} parameters), {len(xt)} x {len(x)} matrix, regularization "
        f"{reg:g}, batch 256, float32 both; pyDVL DirectInfluence(regularization={reg:g}) "
        "(explicit Hessian, dense solve); torchfluence DirectInfluence"
    )
    if PYDVL is None:
        report.add(Result(name, "fit + matrix", note="pyDVL not installed"))
        return

    def peer():
        return PYDVL.DirectInfluence(model, F.cross_entropy, reg).fit(loader).influences(xt, yt, x, y)

    def ours():
        return tfl.DirectInfluence(model, F.cross_entropy, reg).fit(loader).influences(xt, yt, x, y)

    try:
        with quiet():
            peer_scores = peer()
    except Exception as error:
        report.add(Result(name, "fit + matrix", note=f"pyDVL failed: {type(error).__name__}: {error}"))
        return
    scores = ours()
    peer_error, error = relative_error(peer_scores, exact.scores), relative_error(scores, exact.scores)
    peer_quality, ours_quality = f"err {peer_error:.1e}", f"err {error:.1e}"
    agreement = f"{pearson(peer_scores, scores):.6f}"
    if error > 1e-3:  # float32 gradients and H: ~1e-6 expected
        report.failed = True
        report.add(
            Result(
                name,
                "fit + matrix",
                None,
                None,
                peer_quality,
                ours_quality,
                agreement,
                note=f"FAILED: torchfluence error {error:.1e} > 1e-3; not timed",
            )
        )
        return
    with quiet():
        medians = interleaved(
            {"peer": lambda: {"total": timed(peer)[0]}, "ours": lambda: {"total": timed(ours)[0]}},
            sizes.repeats,
        )
    report.add(
        Result(
            name,
            "fit + matrix",
            medians["peer"]["total"],
            medians["ours"]["total"],
            peer_quality,
            ours_quality,
            agreement,
            sizes.repeats,
        )
    )


# -- ResNet-9 (EK-FAC rows) -------------------------------------------------------------------------


def run_kronfluence(
    model: nn.Module, x: Tensor, y: Tensor, xq: Tensor, yq: Tensor, batch: int, reg: float
) -> tuple[dict[str, float], Tensor]:
    from kronfluence.arguments import FactorArguments, ScoreArguments

    # damping_factor is absolute (added to the eigenvalues; None would mean 0.1 x their mean).
    return kronfluence_pairwise(
        model,
        (x, y),
        (xq, yq),
        cpu=True,
        factor_batch=batch,
        query_batch=len(xq),
        train_batch=batch,
        factor_args=FactorArguments(),
        score_args=ScoreArguments(damping_factor=reg),
    )


def run_tfl_ekfac(
    model: nn.Module, x: Tensor, y: Tensor, xq: Tensor, yq: Tensor, batch: int, reg: float
) -> tuple[dict[str, float], Tensor]:
    began = time.perf_counter()
    im = tfl.EkfacInfluence(model, F.cross_entropy, reg, block_size=batch)
    im.fit(DataLoader(TensorDataset(x, y), batch_size=batch))
    fitted = time.perf_counter()
    scores = im.influences(xq, yq, x, y)
    done = time.perf_counter()
    return {"fit": fitted - began, "scores": done - fitted}, scores


def row_ekfac(name: str, index: int, sizes: Sizes, report: Report) -> None:
    width, n, nq, batch = (
        sizes.ekfac_widths[index],
        sizes.ekfac_train[index],
        sizes.ekfac_queries[index],
        sizes.ekfac_batch,
    )
    x, y = cifar_like(n, seed=10 + index)
    xq, yq = cifar_like(nq, seed=20 + index)
    model = trained_resnet9(width, x, y)
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    report.configs[name] = (
        f"ResNet-9 width {width} ({p} trainable conv/linear parameters, BatchNorm frozen), {n} train x {nq} "
        f"queries of 3x32x32, batch {batch} for both; kronfluence FactorArguments() (strategy 'ekfac', true "
        f"Fisher with sampled labels, float64 eigendecomposition), "
        f"ScoreArguments(damping_factor={EKFAC_REG:g}), query batch {nq} (all queries at once); "
        f"torchfluence EkfacInfluence({EKFAC_REG:g}, block_size={batch}) (fisher='true': sampled labels)"
    )
    if KRONFLUENCE is None:
        report.add(Result(name, "fit", note="kronfluence not installed"))
        return
    try:
        with quiet():
            _, peer_scores = run_kronfluence(model, x, y, xq, yq, batch, EKFAC_REG)
    except Exception as error:
        report.add(Result(name, "fit", note=f"kronfluence failed: {type(error).__name__}: {error}"))
        return
    _, scores = run_tfl_ekfac(model, x, y, xq, yq, batch, EKFAC_REG)
    if tuple(peer_scores.shape) != tuple(scores.shape):
        raise CorrectnessError(
            f"{name}: kronfluence scores {tuple(peer_scores.shape)} vs ours {tuple(scores.shape)}"
        )
    r = pearson(peer_scores, scores)
    agreement = f"{r:.4f}"
    if r < 0.95:  # both estimate the same EK-FAC; only the sampled labels differ
        report.failed = True
        report.add(
            Result(
                name,
                "fit + scores",
                agreement=agreement,
                note=f"FAILED: Pearson {r:.3f} < 0.95 with kronfluence; not timed",
            )
        )
        return

    def run_peer():
        return run_kronfluence(model, x, y, xq, yq, batch, EKFAC_REG)[0]

    def run_ours():
        return run_tfl_ekfac(model, x, y, xq, yq, batch, EKFAC_REG)[0]

    with quiet():
        medians = interleaved({"peer": run_peer, "ours": run_ours}, sizes.repeats)
    peer, ours = medians["peer"], medians["ours"]
    report.add(Result(name, "fit", peer["fit"], ours["fit"], runs=sizes.repeats))
    report.add(Result(name, "scores", peer["scores"], ours["scores"], runs=sizes.repeats))
    report.add(
        Result(
            name,
            "fit + scores",
            peer["fit"] + peer["scores"],
            ours["fit"] + ours["scores"],
            agreement=agreement,
            runs=sizes.repeats,
        )
    )


# -- pytorch-influence-functions drop-in ------------------------------------------------------------


class IntLabels(Dataset):
    """(image, int label) items: the original writes labels into JSON, which cannot hold tensors."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def small_cifar_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )


def ptif_config(base: dict, outdir: Path, depth: int) -> dict:
    return {
        **base,
        "outdir": str(outdir),
        "gpu": -1,
        "recursion_depth": depth,
        "r_averaging": 1,
        "damp": PTIF_DAMP,
        "scale": PTIF_SCALE,
        "test_sample_num": 1,
        "test_start_index": 0,
    }


def run_original_ptif(model, train, test, depth: int, n_tests: int, outdir: Path):
    """calc_img_wise as released, on test points 0 .. n_tests - 1.

    As released it passes gpu=0 to calc_influence_single whatever the config says;
    wrapping that one call to pass gpu=-1 is the only change. It also never reads
    damp and scale from the config: its s_test runs at its defaults, 0.01 and 25,
    which are the values given to both here. With test_sample_num=1 and
    test_start_index=0 its loop processes test indices 0 .. num_classes - 1.
    """
    from pytorch_influence_functions import calc_influence_function as original_calc

    inner = original_calc.calc_influence_single

    def on_cpu(*args, **kwargs):
        kwargs["gpu"] = -1
        return inner(*args, **kwargs)

    outdir.mkdir(parents=True)  # the original writes into outdir without creating it
    config = {**ptif_config(ORIGINAL_PTIF.get_default_config(), outdir, depth), "num_classes": n_tests}
    original_calc.calc_influence_single = on_cpu
    try:
        began = time.perf_counter()
        ORIGINAL_PTIF.calc_img_wise(
            config,
            model,
            DataLoader(train, batch_size=PTIF_BATCH, shuffle=True),
            DataLoader(test, batch_size=PTIF_BATCH),
        )
        seconds = time.perf_counter() - began
    finally:
        original_calc.calc_influence_single = inner
    results = json.loads((outdir / "influence_results_0_1.json").read_text())
    indices = sorted(int(k) for k in results)
    return seconds / len(indices), indices, torch.tensor([results[str(i)]["influence"] for i in indices])


def run_tfl_ptif(model, train, test, depth: int, outdir: Path):
    """torchfluence.ptif.calc_img_wise, default test selection: one test point per class."""
    config = ptif_config(tfl_ptif.get_default_config(), outdir, depth)
    began = time.perf_counter()
    results, _, _ = tfl_ptif.calc_img_wise(
        config,
        model,
        DataLoader(train, batch_size=PTIF_BATCH, shuffle=True),
        DataLoader(test, batch_size=PTIF_BATCH),
    )
    seconds = time.perf_counter() - began
    indices = sorted(int(k) for k in results)
    return seconds / len(indices), indices, torch.tensor([results[str(i)]["influence"] for i in indices])


def ptif_references(model, train, x, y, xt, yt, depth: int) -> tuple[Tensor, Tensor | None]:
    """What torchfluence.ptif documents it returns, computed through the engine directly, and the exact value.

    ``influence[j] = -(1/n) grad L(z_test)^T (H + damp I)^-1 grad L(z_j)``: the first
    reference estimates the inverse with LiSSA at the same settings (a check that the
    drop-in passes damp, scale, depth, sign and the 1/n through); the second solves
    exactly by CG, which needs H + damp I positive definite: at a network that is not
    at a minimum it often is not, and then LiSSA's target does not exist either.
    """
    n = len(x)
    torch.manual_seed(42)  # ptif's default seed; LiSSA reads the shuffling loader's order
    lissa = tfl.LissaInfluence(model, F.cross_entropy, PTIF_DAMP, maxiter=depth, scale=PTIF_SCALE, seed=42)
    engine = -lissa.fit(DataLoader(train, batch_size=PTIF_BATCH, shuffle=True)).influences(xt, yt, x, y) / n
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = (
                -tfl.CgInfluence(model, F.cross_entropy, PTIF_DAMP, rtol=1e-4)
                .fit((x, y))
                .influences(xt, yt, x, y)
                / n
            )
    except ValueError:  # "CG met a direction of non-positive curvature"
        exact = None
    return engine, exact


def row_ptif(name: str, sizes: Sizes, report: Report) -> None:
    n = sizes.ptif_train
    # LiSSA converges only where H + damp I is positive definite and scale exceeds its largest
    # eigenvalue; near its initialisation this CNN has eigenvalues down to about -1, where the
    # recursion diverges (to inf at depth 5000). So the data is learnable (one mean image per
    # class plus unit noise) and the model is trained to a minimum of the L2-regularised loss
    # (WEIGHT_DECAY < damp), as the digits models are.
    g = torch.Generator().manual_seed(30)
    means = 0.3 * torch.randn(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    yt = torch.arange(20) % 10  # test point c is the first of class c: both libraries' defaults pick 0..9
    x = means[y] + torch.randn(n, 3, 32, 32, generator=g)
    xt = means[yt] + torch.randn(20, 3, 32, 32, generator=g)
    torch.manual_seed(0)
    model = train_to_minimum(small_cifar_cnn(), x, y, sizes.ptif_epochs, sizes.ptif_lbfgs_iterations, lr=3e-3)
    train, test = IntLabels(x, y), IntLabels(xt, yt)
    # The original's guidance: r_averaging x recursion_depth = training set size (--ptif-depth overrides).
    depth = sizes.ptif_depth or n
    k = sizes.ptif_original_tests
    p = sum(q.numel() for q in model.parameters())
    report.configs[name] = (
        f"CIFAR-shaped CNN ({p} parameters), {n} train (class mean images + noise), trained to a minimum; "
        f"both: recursion_depth {depth}, r_averaging 1, damp {PTIF_DAMP}, scale {PTIF_SCALE}, train loader "
        f"batch {PTIF_BATCH} (shuffled), LiSSA; the original (gpu forced to -1) on test points 0..{k - 1}, "
        "torchfluence.ptif on its default selection (1 per class: points 0..9). Quality: Pearson with the "
        "exact influences (CgInfluence(damp, rtol=1e-4)) on the same points, where H + damp I is positive "
        "definite"
    )
    if ORIGINAL_PTIF is None:
        report.add(Result(name, "per test point", note="pytorch-influence-functions not installed"))
        return
    engine, exact = ptif_references(model, train, x, y, xt[:10], yt[:10], depth)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        counter = iter(range(10**6))

        def original():
            with quiet():
                return run_original_ptif(model, train, test, depth, k, tmp / f"original{next(counter)}")

        def ours():
            with quiet():
                return run_tfl_ptif(model, train, test, depth, tmp / f"ours{next(counter)}")

        try:
            _, peer_indices, peer_rows = original()
        except Exception as error:
            report.add(
                Result(name, "per test point", note=f"original failed: {type(error).__name__}: {error}")
            )
            return
        _, indices, rows = ours()
        if indices != list(range(10)) or peer_indices != list(range(k)):
            raise CorrectnessError(f"{name}: test points {indices} (ours), {peer_indices} (original)")
        consistency = pearson(rows, engine)
        if exact is None:
            qualities = ("r vs exact: n/a", "r vs exact: n/a")
        else:
            qualities = (
                f"r vs exact {pearson(peer_rows, exact[:k]):.4f}",
                f"r vs exact {pearson(rows, exact):.4f}",
            )
        agreement = f"{pearson(peer_rows, rows[:k]):.4f}"
        if consistency < 0.99:
            report.failed = True
            report.add(
                Result(
                    name,
                    "per test point",
                    None,
                    None,
                    *qualities,
                    agreement,
                    note=f"FAILED: torchfluence.ptif vs -(1/n) LissaInfluence: Pearson {consistency:.4f} "
                    "< 0.99; not timed",
                )
            )
            return
        medians = interleaved(
            {"peer": lambda: {"s": original()[0]}, "ours": lambda: {"s": ours()[0]}}, sizes.repeats
        )
    note = f"original: {k} test point(s) per run, torchfluence: 10; ptif vs engine LiSSA r {consistency:.4f}"
    if exact is None:
        note += "; no exact reference: H + damp I is not positive definite here"
    report.add(
        Result(
            name,
            "per test point",
            medians["peer"]["s"],
            medians["ours"]["s"],
            *qualities,
            agreement,
            sizes.repeats,
            note=note,
        )
    )


# -- main -------------------------------------------------------------------------------------------


def selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(ROWS)

    def matches(o: str) -> list[str]:  # a full name selects that row only; otherwise a prefix
        return [o] if o in ROWS else [row for row in ROWS if row.startswith(o)]

    unknown = [o for o in only if not matches(o)]
    if unknown:
        raise SystemExit(f"--only: unknown row(s) {unknown}; rows are {', '.join(ROWS)}")
    wanted = {row for o in only for row in matches(o)}
    return [row for row in ROWS if row in wanted]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    peers = ", ".join(f"{p} {version(p)}" for p in ("pydvl", "kronfluence", "pytorch-influence-functions"))
    return (
        f"{cpu}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; Python "
        f"{platform.python_version()}; {environment(torch.device('cpu'))}\npeers: {peers}"
    )


def load() -> str:
    """The 1-minute load average against the CPU count: timings are only comparable on an idle machine."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every row runs")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"rows (or prefixes) to run: {', '.join(ROWS)}"
    )
    parser.add_argument("--repeats", type=int, help="timed rounds per row (default 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument(
        "--ptif-depth", type=int, help="ptif row: LiSSA recursion_depth (default: the training set size)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        sizes = Sizes(**{**sizes.__dict__, "repeats": args.repeats})
    if args.ptif_depth is not None:
        if args.ptif_depth < 1:
            raise SystemExit(f"--ptif-depth must be >= 1, got {args.ptif_depth}")
        sizes = Sizes(**{**sizes.__dict__, "ptif_depth": args.ptif_depth})
    rows = selected(args.only)
    torch.manual_seed(0)

    runners: dict[str, Callable[[], None]] = {
        "cg-mlp": lambda: row_cg("cg-mlp", "mlp", 2e-3, sizes, report),
        "cg-cnn": lambda: row_cg("cg-cnn", "cnn", 2e-3, sizes, report),
        "cg-mlp-reg1e-2": lambda: row_cg("cg-mlp-reg1e-2", "mlp", 1e-2, sizes, report),
        "direct-mlp": lambda: row_direct("direct-mlp", "mlp", 2e-3, sizes, report),
        "direct-cnn": lambda: row_direct("direct-cnn", "cnn", 2e-3, sizes, report),
        "ekfac-100k": lambda: row_ekfac("ekfac-100k", 0, sizes, report),
        "ekfac-1m": lambda: row_ekfac("ekfac-1m", 1, sizes, report),
        "ptif": lambda: row_ptif("ptif", sizes, report),
    }
    report = Report()
    info = machine()
    print(info, flush=True)
    print(f"at start: {load()}", flush=True)
    for row in rows:
        began = time.perf_counter()
        try:
            runners[row]()
        except Exception as error:  # one broken row must not hide the others
            report.failed = True
            traceback.print_exc()
            report.add(Result(row, "-", note=f"FAILED: {type(error).__name__}: {error}"))
        print(f"  ({row}: {time.perf_counter() - began:.1f} s including checks)", flush=True)

    print()
    print(info)
    print(f"at end: {load()}")
    print(
        f"sizes: {'quick' if args.quick else 'full'}; timed pairs per row: {sizes.repeats} (median); ratio = "
        "peer time / torchfluence time; err = relative Frobenius error of the influence matrix against the "
        "float64 oracle; res = largest relative residual ||(H + lambda I) f - g|| / ||g|| (float64 H)\n"
    )
    text = print_table(HEADERS, [r.cells() for r in report.results])
    print()
    for row, config in report.configs.items():
        print(f"- {row}: {config}")
    if args.markdown:
        configs = "\n".join(f"- {row}: {config}" for row, config in report.configs.items())
        Path(args.markdown).write_text(f"{info}\n\n{text}\n\n{configs}\n")
    if report.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
