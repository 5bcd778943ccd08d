"""End to end on one GPU: EK-FAC factors + pairwise scores + top-k, torchfluence against kronfluence 1.0.1.

The workload is the job of kronfluence's CIFAR-10 example at full size: a
ResNet-9 (DAWNBench layout, base width 64, ~6.5M parameters; kronfluence's
example uses a narrower ResNet-9 of ~2.3M) on 50,000 CIFAR-shaped training
images, scored against 2,000 queries. The data is synthetic and learnable
(``_resnet9.synthetic_cifar``: a smooth pattern per class at a random contrast
and shift, unit noise, 5% random labels), generated on the GPU from fixed
seeds. The model is trained for one epoch (SGD, batch 512, BatchNorm in
training mode; timed, as "one epoch": the yardstick a user feels), then put in
eval mode with BatchNorm frozen, so the conv and linear weights are the scored
parameters on both sides. Both libraries get the same model, the same
GPU-resident tensors and the same damping, in the same process.

Rows of the race, in the order they run (kronfluence first: its float32 row is
the reference every other row is compared with):

1. kronfluence fp32: ``prepare_model`` on a copy; ``Analyzer(cpu=False)``;
   ``fit_all_factors(factor_args=FactorArguments())`` (EK-FAC, true Fisher with
   sampled labels, float32 covariances and lambdas, float64 eigendecomposition);
   ``compute_pairwise_scores(score_args=ScoreArguments(damping_factor=REG))``; top-k
   by ``torch.topk`` on its matrix. Query batch 1000, as in kronfluence's CIFAR-10
   example; the factor and training batches, which the example leaves to
   kronfluence's automatic search (minutes here), are fixed (``--peer-batch``, 1024
   on a GPU). kronfluence writes factors and scores to files (a temporary
   directory); reading the scores back is part of its scores stage.
2. kronfluence AMP: the same with the low-precision settings of kronfluence's
   CIFAR-10 example (``all_low_precision_factor_arguments`` and
   ``all_low_precision_score_arguments``, bfloat16).
3. torchfluence fp32: ``EkfacInfluence(model, F.cross_entropy, REG, block_size=1024)``
   (true Fisher with sampled labels), ``fit((x, y))``, ``train_influences(xq, yq)`` ->
   (n_query, n_train) float32, then ``top_k_of_scores`` of that matrix (exact, ties
   by lower index); IEEE float32 products throughout.
4. torchfluence one pass: the same fit with ``score_dtype=torch.bfloat16``, then
   ``top_k(xq, yq, k=10, with_scores=True)``: the matrix and the top-k lists from one
   pass over the training data (its scores column holds that pass; top-k is "same
   pass"). A torchfluence whose ``top_k`` takes no ``with_scores`` runs
   ``train_influences`` then ``top_k`` (a second pass), and the row says so.
   ``--one-pass-scores fp32`` scores in float32 instead.
5. torchfluence bf16: row 4 with ``factor_dtype=torch.bfloat16`` (16-bit operands
   in the fit's covariance and rotation products and the query preconditioning) and
   ``capture_dtype=torch.bfloat16`` (the fit's model passes under autocast, as
   kronfluence's AMP row). A torchfluence that refuses a keyword gives the row "not
   available in this build".
6. (extra) torchfluence TF32 fit: row 4 with ``allow_tf32=True``; it runs last and
   only within ``--extra-budget``. ``--no-tf32-run`` leaves it out.

Damping: REG is absolute and added to the EK-FAC eigenvalues by both
libraries. The default, ``--reg auto``, is 0.1 x the mean corrected eigenvalue
over all scored layers (kronfluence's own heuristic fraction, taken over the
whole model), measured once by an untimed torchfluence fit on the warm-up
subset and printed. ``--reg 1e-3`` fixes the value instead.

Measurement: a warm-up runs every row on 1,024 training x 64 queries (CUDA
context, cuBLAS/cuDNN handles, kernel selection; a row that fails there is not
run again at full size: its error is the row's), then each runs once at full
size, every stage bracketed by ``torch.cuda.synchronize``. After an
out-of-memory error a stage is run again with smaller batches (kronfluence: all
halved; torchfluence: ``block_size`` halved, down to 128) and the row says so.
Agreement with kronfluence fp32: the mean over queries of the Spearman rank
correlation (ranks on the device), Pearson over all scores and the overlap of
the 10 most helpful training points per query. Peak GPU memory is
``torch.cuda.max_memory_allocated`` over a row (reset before each; the model and
data, ~0.7 GiB, included).

Time: ``--budget`` seconds for the whole script (default 380 on a GPU). Rows 1
and 3 always run; every other row runs only when its estimated time, plus that
of the required rows still to come, fits in what is left (the extra row: in
what is left of ``--extra-budget``); a row left out says so in the table.
Estimates come from the rows already run, with the ratios measured on an H100 at
this size: kronfluence AMP 0.23x kronfluence fp32 (27.7 s against 120.3 s);
torchfluence with bf16 scoring 0.36x (42.8 s: fit 22.9 + scores 20.0); float32
scoring about 2.2x the bf16 scores stage (estimated, not measured); 10% margin.

A row that cannot run is an error row (FAIL and the reason), never a silent
omission: kronfluence that does not import (carry ``.whl/`` from ``make
gpu-peer-wheels``) fails both kronfluence rows. The script exits 3 when a row
failed (after writing its tables), 1 when it crashed. ``--skip-peer`` leaves
kronfluence out on purpose (the table says so).

Output: the race table (method, fit s, scores s, top-k s, total s, peak GiB,
Spearman vs kronfluence fp32) with the device, driver, torch and CUDA versions,
printed last and written to ``--markdown`` (ready for benchmarks/RESULTS.md, with
a details table of Pearson, top-10 overlap and speed-ups below it); every number
to ``--json``. Both files are rewritten after every row, so a script cut short
leaves what it measured.

    python benchmarks/bench_gpu_e2e.py --device cuda [--markdown FILE] [--json FILE]
    python benchmarks/bench_gpu_e2e.py --device cpu --quick --peer-amp  # tiny sizes, every row's code path
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import io
import json
import math
import platform
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
import torchfluence as tfl  # noqa: E402
from _resnet9 import KronfluenceRun, freeze_batchnorm, resnet9, synthetic_cifar, train_epochs  # noqa: E402
from _timing import print_table  # noqa: E402

T = TypeVar("T")
Data = tuple[Tensor, Tensor]  # (inputs, labels)
TOP = 10
MIN_BLOCK = 128
GIB = 2**30
KRON_FP32, KRON_AMP = "kronfluence fp32", "kronfluence AMP (bf16)"
TFL_FP32 = "torchfluence fp32"
TFL_ONE = "torchfluence one pass"
TFL_LOW = "torchfluence bf16 factors + captures, one pass"
TFL_TF32 = "torchfluence TF32 fit, one pass"
REQUIRED = (KRON_FP32, TFL_FP32)  # run whatever the estimates say
OWN_TOP = "top-10 of the pass vs top-10 of its own matrix"
# Ratios measured on an H100 at the default size (ResNet-9 width 64, 50,000 x 2,000).
AMP_OVER_FP32 = 27.7 / 120.3  # kronfluence AMP against kronfluence fp32, fit + scores
FP32_OVER_BF16_SCORES = 2.2  # torchfluence's scores stage, float32 against bfloat16 operands (estimated)
TFL_OVER_KRON = {None: 0.6, torch.bfloat16: 42.8 / 120.3}  # torchfluence rows by score dtype, before one ran
MARGIN = 1.1  # on every estimate
ROWS_FAILED = 3  # exit status when a row failed (the tables are complete); 1 is a crash


class Unavailable(Exception):
    """The installed torchfluence refuses an option the row needs: "not available in this build"."""


@dataclass(frozen=True)
class Spec:
    """One row of the race: which library, with which settings."""

    name: str
    peer: bool  # kronfluence
    amp: bool = False  # kronfluence's all-low-precision bfloat16 settings
    score_dtype: torch.dtype | None = None  # torchfluence's scoring operands
    factor_dtype: torch.dtype | None = None  # torchfluence's fit operands
    capture_dtype: torch.dtype | None = None  # torchfluence's autocast of the fit's model passes
    one_pass: bool = False  # torchfluence: top_k(..., with_scores=True)
    tf32: bool = False  # torchfluence: allow_tf32=True
    extra: bool = False  # runs within --extra-budget

    def describe(self) -> str:
        if self.peer:
            return ("all_low_precision_*_arguments(bfloat16)" if self.amp else
                    "FactorArguments(strategy='ekfac'), ScoreArguments(damping_factor=REG)") + "; torch.topk"
        kw = ["block_size"]
        kw += [f"score_dtype={self.score_dtype}"] if self.score_dtype is not None else []
        kw += [f"factor_dtype={self.factor_dtype}"] if self.factor_dtype is not None else []
        kw += [f"capture_dtype={self.capture_dtype}"] if self.capture_dtype is not None else []
        kw += ["allow_tf32=True"] if self.tf32 else []
        call = "top_k(k=10, with_scores=True)" if self.one_pass else "train_influences + top_k_of_scores"
        return f"EkfacInfluence({', '.join(kw)}); {call}"


# -- runs -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One row's run: stage seconds, peak memory, what it returned, how it agrees."""

    spec: Spec
    stages: dict[str, float] = field(default_factory=dict)
    peak_gib: float | None = None
    error: str = ""  # FAIL
    unavailable: str = ""  # the build lacks an option
    skipped: str = ""  # left out for time (or on purpose)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    scores: Tensor | None = None  # (n_query, n_train) float32, kept on the CPU between runs
    top: Tensor | None = None  # (n_query, TOP) indices of the most helpful training points

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def job(self) -> float | None:
        """fit + scores + top-k seconds (the one-pass rows: fit + the pass)."""
        if not self.ran or "fit" not in self.stages or "scores" not in self.stages:
            return None
        return self.stages["fit"] + self.stages["scores"] + self.stages.get("top-k", 0.0)

    @property
    def ran(self) -> bool:
        return not (self.error or self.unavailable or self.skipped)

    def state(self) -> str:
        """'' for a row that ran through, else FAIL / skipped / not available in this build."""
        if self.error:
            return "FAIL"
        if self.unavailable:
            return "not available in this build"
        return "skipped" if self.skipped else ""

    def status(self) -> str:
        if not self.ran:
            return f"{self.state()}: {self.error or self.unavailable or self.skipped}"
        times = ", ".join(f"{k} {v:.2f} s" for k, v in self.stages.items())
        return times + ("" if self.peak_gib is None else f"; peak GPU memory {self.peak_gib:.2f} GiB")

    def record(self) -> dict:
        return {
            "config": self.spec.describe(),
            "state": self.state() or "ok",
            "stages_s": self.stages,
            "total_s": self.job,
            "peak_gpu_gib": self.peak_gib,
            "error": self.error or None,
            "unavailable": self.unavailable or None,
            "skipped": self.skipped or None,
            "notes": self.notes,
            "metrics": self.metrics,
        }


@dataclass
class Context:
    """What every run shares."""

    device: torch.device
    model: nn.Module
    train: tuple[Tensor, Tensor]
    queries: tuple[Tensor, Tensor]
    reg: float
    args: argparse.Namespace

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], T]) -> tuple[float, T]:
        self.sync()
        began = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - began, out


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def one_line(error: BaseException, limit: int = 300) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences the libraries' prints, progress bars and warnings (alike for both)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def attempt(ctx: Context, run: Run, body: Callable[[], None]) -> Run:
    """Runs `body` (which fills `run`) quietly, with its peak GPU memory; an error is recorded in `run`.

    A failure becomes a row, never the end of the script. `body` keeps its tensors in
    its own frame, so they are freed with it.
    """
    if ctx.cuda:
        ctx.sync()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    try:
        with quiet():
            body()
    except Unavailable as error:
        run.unavailable = str(error)
    except Exception as error:
        run.error = one_line(error)
        traceback.print_exc()
    if ctx.cuda:
        with contextlib.suppress(Exception):  # after a device error, the row keeps its error
            ctx.sync()
            run.peak_gib = torch.cuda.max_memory_allocated(ctx.device) / GIB
    free_memory(ctx.device)  # after the except clause has dropped the traceback and its frames
    return run


def shrinking(
    ctx: Context, stage: Callable[[], T], shrink: Callable[[], str | None], notes: list[str]
) -> tuple[float, T]:
    """Times `stage`; after an out-of-memory error, `shrink` (which makes the work smaller and says how,
    or returns None when it cannot) and `stage` again. Returns the seconds of the attempt that ran through."""
    while True:
        try:
            return ctx.timed(stage)
        except Exception as error:
            if not is_oom(error):
                raise
        free_memory(ctx.device)  # outside the except clause: the failed attempt's frames are gone
        note = shrink()
        if note is None:
            raise torch.cuda.OutOfMemoryError("out of memory at the smallest batch / block size")
        notes.append(note)


def chunks(n: int, size: int) -> list[slice]:
    size = n if size <= 0 else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# -- kronfluence ------------------------------------------------------------------------------------


def kronfluence_problem() -> str:
    """'' when kronfluence and the parts of it the rows use import, else why not."""
    try:
        import kronfluence  # noqa: F401
        from kronfluence.analyzer import Analyzer, prepare_model  # noqa: F401
        from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: F401
        from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments  # noqa: F401
        from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments  # noqa: F401
    except Exception as error:  # ImportError, or an incompatibility of its dependencies
        return (f"kronfluence does not import ({one_line(error, 200)}); carry .whl/ from `make "
                "gpu-peer-wheels` (gpu_suite.sh installs it; its other dependencies must be there)")
    return ""


def kronfluence_arguments(amp: bool, reg: float):
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
    from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments

    if amp:
        return (
            all_low_precision_factor_arguments(strategy="ekfac", dtype=torch.bfloat16),
            all_low_precision_score_arguments(damping_factor=reg, dtype=torch.bfloat16),
        )
    return FactorArguments(strategy="ekfac"), ScoreArguments(damping_factor=reg)


def run_kronfluence(ctx: Context, spec: Spec, train: Data, queries: Data) -> Run:
    args, run = ctx.args, Run(spec)
    size = {
        "factors": min(args.peer_batch, len(train[0])),
        "queries": min(args.query_batch, len(queries[0])),
        "train": min(args.peer_batch, len(train[0])),
    }

    def halve(*keys: str) -> Callable[[], str | None]:
        def shrink() -> str | None:
            if all(size[k] <= 1 for k in keys):
                return None
            before = {k: size[k] for k in keys}
            size.update({k: max(1, size[k] // 2) for k in keys})
            after = {k: size[k] for k in keys}
            return f"out of memory at batch {before}: retried at {after}"

        return shrink

    def body() -> None:
        factor_args, score_args = kronfluence_arguments(spec.amp, ctx.reg)
        torch.manual_seed(0)  # kronfluence draws the sampled labels from the global generator
        with KronfluenceRun(
            ctx.model, train, queries, cpu=not ctx.cuda, factor_args=factor_args, score_args=score_args
        ) as k:
            fit_s, _ = shrinking(ctx, lambda: k.fit(size["factors"]), halve("factors"), run.notes)
            scores_s, scores = shrinking(
                ctx, lambda: k.scores(size["queries"], size["train"]), halve("queries", "train"), run.notes
            )
        top_s, top = ctx.timed(lambda: torch.topk(scores.to(ctx.device).float(), TOP, dim=1).indices)
        run.stages = {"fit": fit_s, "scores": scores_s, "top-k": top_s}
        run.scores, run.top = scores.float().cpu(), top.cpu()

    attempt(ctx, run, body)
    run.notes.insert(0, "batches: factors {factors}, queries {queries}, train {train}".format(**size))
    return run


# -- torchfluence -----------------------------------------------------------------------------------


def ekfac(ctx: Context, spec: Spec, block: int) -> tfl.EkfacInfluence:
    """The row's EkfacInfluence; a keyword this torchfluence refuses raises :class:`Unavailable`."""
    extra: dict = {}
    if spec.score_dtype is not None:
        extra["score_dtype"] = spec.score_dtype
    if spec.factor_dtype is not None:
        extra["factor_dtype"] = spec.factor_dtype
    if spec.capture_dtype is not None:
        extra["capture_dtype"] = spec.capture_dtype
    if spec.tf32:
        extra["allow_tf32"] = True
    try:
        return tfl.EkfacInfluence(ctx.model, F.cross_entropy, ctx.reg, block_size=block, **extra)
    except TypeError as error:
        refused = [k for k in extra if k in str(error)]
        if not refused:
            raise
        names = ", ".join(refused)
        raise Unavailable(f"{names}= refused by this torchfluence ({one_line(error, 160)})") from None


def has_one_pass() -> bool:
    """Whether this torchfluence's top_k can keep the matrix it scores (``with_scores=True``)."""
    try:
        return "with_scores" in inspect.signature(tfl.EkfacInfluence.top_k).parameters
    except (TypeError, ValueError):
        return False


def run_torchfluence(ctx: Context, spec: Spec, train: Data, queries: Data) -> Run:
    (x, y), (xq, yq) = train, queries
    parts = chunks(len(xq), ctx.args.query_chunk)
    run = Run(spec)
    state: dict = {"block": ctx.args.block}
    one_pass = spec.one_pass and has_one_pass()

    def shrink() -> str | None:
        if state["block"] <= MIN_BLOCK:
            return None
        state["block"] //= 2
        if "im" in state:  # fitted: the smaller blocks apply to the queries and the scoring
            state["im"].block_size = state["block"]
        return f"out of memory at block_size {2 * state['block']}: retried at {state['block']}"

    def fit() -> None:
        state.pop("im", None)
        state["im"] = ekfac(ctx, spec, state["block"]).fit((x, y))

    def scores() -> Tensor:
        pieces = [state["im"].train_influences(xq[p], yq[p]) for p in parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def streamed_top_k() -> Tensor:
        return torch.cat([state["im"].top_k(xq[p], yq[p], k=TOP).helpful_indices for p in parts])

    def scores_and_top_k() -> tuple[Tensor, Tensor]:
        results = [state["im"].top_k(xq[p], yq[p], k=TOP, with_scores=True) for p in parts]
        return torch.cat([r.scores for r in results]), torch.cat([r.helpful_indices for r in results])

    def body() -> None:
        fit_s, _ = shrinking(ctx, fit, shrink, run.notes)
        if one_pass:
            pass_s, (matrix, top) = shrinking(ctx, scores_and_top_k, shrink, run.notes)
            run.stages = {"fit": fit_s, "scores": pass_s}
            # The merged lists against the top-10 of the matrix the same pass filled (untimed check).
            run.metrics[OWN_TOP] = overlap(top, tfl.top_k_of_scores(matrix, TOP).largest_indices)
        else:
            scores_s, matrix = shrinking(ctx, scores, shrink, run.notes)
            if spec.one_pass:  # asked for one pass, but this build's top_k cannot keep the matrix
                top_s, top = shrinking(ctx, streamed_top_k, shrink, run.notes)
            else:  # the top-k of the matrix just scored, exact with ties by lower index
                top_s, top = ctx.timed(lambda: tfl.top_k_of_scores(matrix, TOP).largest_indices)
            run.stages = {"fit": fit_s, "scores": scores_s, "top-k": top_s}
        run.scores, run.top = matrix.float().cpu(), top.cpu()

    attempt(ctx, run, body)
    state.clear()  # the fitted model, also after a failure
    free_memory(ctx.device)
    if spec.one_pass and not one_pass:
        run.notes.append(
            "this torchfluence's top_k takes no with_scores: train_influences, then top_k (a second pass)"
        )
    if len(parts) > 1:
        run.notes.append(f"queries in {len(parts)} calls of {parts[0].stop}")
    return run


def eigenvalue_means(ctx: Context, train: tuple[Tensor, Tensor]) -> tuple[float, dict[str, float]]:
    """Mean corrected EK-FAC eigenvalue over all scored layers, and per layer (untimed torchfluence fit)."""
    with quiet():
        im = tfl.EkfacInfluence(ctx.model, F.cross_entropy, 1e-30, block_size=ctx.args.block).fit(train)
    total = sum(float(f.eigenvalues.sum()) for f in im.factors.values())
    count = sum(f.eigenvalues.numel() for f in im.factors.values())
    layers = {name: float(f.eigenvalues.mean()) for name, f in im.factors.items()}
    del im
    free_memory(ctx.device)
    return total / count, layers


# -- agreement --------------------------------------------------------------------------------------


def pearson(a: Tensor, b: Tensor, device: torch.device, rows: int = 256) -> float:
    """Pearson correlation over all entries, in float64 on `device`, `rows` rows at a time."""
    parts = chunks(len(a), rows)
    mean_a = sum(float(a[r].to(device).double().sum()) for r in parts) / a.numel()
    mean_b = sum(float(b[r].to(device).double().sum()) for r in parts) / b.numel()
    ab = aa = bb = 0.0
    for r in parts:
        da, db = a[r].to(device).double() - mean_a, b[r].to(device).double() - mean_b
        ab, aa, bb = ab + float((da * db).sum()), aa + float(da.square().sum()), bb + float(db.square().sum())
    return ab / math.sqrt(aa * bb)


def ranks(m: Tensor) -> Tensor:
    """Ranks 0 .. n-1 along each row (ties broken by position), float64."""
    order = m.argsort(dim=1)
    out = torch.empty_like(order)
    out.scatter_(1, order, torch.arange(m.shape[1], device=m.device).expand_as(order))
    return out.double()


def spearman(a: Tensor, b: Tensor, device: torch.device, rows: int = 256) -> float:
    """Mean over rows of the Spearman rank correlation of a[i] and b[i] (ranked on `device`)."""
    values = []
    for r in chunks(len(a), rows):
        ra, rb = ranks(a[r].to(device)), ranks(b[r].to(device))
        ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
        values.append((ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1)))
    return float(torch.cat(values).mean())


def overlap(a: Tensor, b: Tensor) -> float:
    """Mean fraction of the entries of row i of `a` (n, k) that are in row i of `b` (n, k)."""
    a, b = a.cpu(), b.cpu()
    return float((a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).float().mean())


def agree(run: Run, reference: Run, device: torch.device, sign: float) -> None:
    """Pearson, mean per-query Spearman and top-10 overlap of `run` with `reference` (times `sign`)."""
    if run.scores is None or reference.scores is None:
        return
    ref = sign * reference.scores
    run.metrics["pearson"] = pearson(run.scores, ref, device)
    run.metrics["spearman"] = spearman(run.scores, ref, device)
    run.metrics["top10"] = overlap(run.top, torch.topk(ref, TOP, dim=1).indices)


def compare(run: Run, runs: dict[str, Run], device: torch.device, sign: float) -> None:
    """Agreement of a finished row with kronfluence fp32, and of a low-precision torchfluence row with
    torchfluence fp32 (the precision alone, without the two libraries' differences)."""
    kron, ours = runs.get(KRON_FP32), runs.get(TFL_FP32)
    if kron is not None and run is not kron:
        agree(run, kron, device, sign)
    if OWN_TOP in run.metrics:
        run.notes.append(f"{OWN_TOP}: {run.metrics[OWN_TOP]:.3f}")
    low = not run.spec.peer and ours is not None and run is not ours
    if low and ours.scores is not None and run.scores is not None:
        run.metrics["spearman vs torchfluence fp32"] = rho = spearman(run.scores, ours.scores, device)
        run.metrics["pearson vs torchfluence fp32"] = r = pearson(run.scores, ours.scores, device)
        run.notes.append(f"vs torchfluence fp32: Spearman {rho:.4f}, Pearson {r:.4f}")
    if run is not kron and run is not ours:  # the references' matrices stay for the rows after
        run.scores = None


# -- time -------------------------------------------------------------------------------------------


def estimated_seconds(spec: Spec, done: dict[str, Run]) -> float | None:
    """Rough time of a row from the rows already run (None: no basis)."""
    kron = done.get(KRON_FP32)
    kron_s = kron.job if kron is not None else None
    if spec.peer:
        return MARGIN * AMP_OVER_FP32 * kron_s if spec.amp and kron_s else None
    ours = [r for r in done.values() if not r.spec.peer and r.job]
    if ours:  # a torchfluence row has run: its fit, its scores stage scaled by the scoring dtype
        base = ours[0]
        scores = base.stages["scores"] + base.stages.get("top-k", 0.0)
        if spec.score_dtype is not None and base.spec.score_dtype is None:
            scores /= FP32_OVER_BF16_SCORES
        elif spec.score_dtype is None and base.spec.score_dtype is not None:
            scores *= FP32_OVER_BF16_SCORES
        return MARGIN * (base.stages["fit"] + scores)
    if kron_s:
        return MARGIN * TFL_OVER_KRON.get(spec.score_dtype, 0.6) * kron_s
    return None


def why_skip(spec: Spec, specs: list[Spec], done: dict[str, Run], elapsed: float, budget: float) -> str:
    """'' when the row runs now; else why it is left out. Required rows run while any budget is left; an
    optional row needs its own estimate plus the estimates of the required rows after it (an extra row:
    within `budget`, its own)."""
    left = budget - elapsed
    if spec.name in REQUIRED:
        return "" if left > 0 else f"budget spent ({elapsed:.0f} s of {budget:.0f} s)"
    estimate = estimated_seconds(spec, done)
    if estimate is None:
        return ""
    later = specs[specs.index(spec) + 1:]
    kept = sum(estimated_seconds(s, done) or 0.0 for s in later if s.name in REQUIRED and s.name not in done)
    if estimate + kept <= left:
        return ""
    for_later = f" + ~{kept:.0f} s kept for the required rows after it" if kept else ""
    return f"no time: ~{estimate:.0f} s{for_later}, {left:.0f} s of the budget left"


# -- environment ------------------------------------------------------------------------------------


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> str:
    info = tfl.build_info()
    libraries = (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}); "
        f"torchfluence {info['version']} (cuda build: {info['cuda']}); kronfluence {version('kronfluence')}; "
        f"Python {platform.python_version()}"
    )
    if device.type != "cuda":
        cpu = platform.processor() or platform.machine()
        return f"device: CPU ({cpu}), {torch.get_num_threads()} threads; {libraries}"
    driver = "unknown"
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    props = torch.cuda.get_device_properties(device)
    flags = (
        f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32} "
        "(torch's defaults, left alone)"
    )
    return (f"device: {props.name} ({props.total_memory / GIB:.0f} GiB, cc {props.major}.{props.minor}), "
            f"driver {driver}; {libraries}; {flags}")


# -- report -----------------------------------------------------------------------------------------

HEADERS = ["method", "fit s", "scores s", "top-k s", "total s", "peak GiB", "Spearman vs kronfluence fp32"]
DETAIL_HEADERS = ["method", "Pearson", "top-10 overlap", "vs kronfluence fp32", "vs kronfluence AMP",
                  "Spearman vs torchfluence fp32", "configuration"]


def seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f}" if s < 100 else f"{s:.1f}"


def speedup(base: Run | None, run: Run) -> str:
    if base is None or base.job is None or run.job is None:
        return "-"
    return "1.0x" if base is run else f"{base.job / run.job:.2f}x"


def metric(run: Run, key: str, digits: int = 4) -> str:
    if run.spec.name == KRON_FP32 and run.ran:
        return "reference"
    return f"{run.metrics[key]:.{digits}f}" if key in run.metrics else "-"


def method_cell(run: Run) -> str:
    state = run.state()
    return run.name if not state else f"{run.name} ({state})"


def table(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        top = "same pass" if run.ran and "scores" in run.stages and "top-k" not in run.stages else \
            seconds(run.stages.get("top-k"))
        peak = "-" if run.peak_gib is None or not run.ran else f"{run.peak_gib:.2f}"
        rows.append([method_cell(run), seconds(run.stages.get("fit")), seconds(run.stages.get("scores")), top,
                     seconds(run.job), peak, metric(run, "spearman")])
    return rows


def detail_table(runs: list[Run], by_name: dict[str, Run]) -> list[list[str]]:
    kron, amp = by_name.get(KRON_FP32), by_name.get(KRON_AMP)
    return [[run.name, metric(run, "pearson"), metric(run, "top10", 3), speedup(kron, run), speedup(amp, run),
             "-" if "spearman vs torchfluence fp32" not in run.metrics
             else f"{run.metrics['spearman vs torchfluence fp32']:.4f}", run.spec.describe()]
            for run in runs if run.ran]


def headline(runs: list[Run]) -> str:
    """One line for the suite's summary: failures first, then each row's total, speed-up against
    kronfluence fp32 and Spearman rho with it."""
    by_name = {r.name: r for r in runs}
    kron = by_name.get(KRON_FP32)
    errors: dict[str, list[str]] = {}  # rows failing for the same reason share one entry
    for r in runs:
        if r.error:
            errors.setdefault(r.error, []).append(r.name)
    parts = [f"FAIL {', '.join(names)}: {error[:160]}" for error, names in errors.items()]
    for r in runs:
        if r.job is None:
            if not r.error:
                parts.append(f"{r.name}: {r.state()}")
            continue
        text = f"{r.name} {r.job:.1f} s"
        if kron is not None and kron.job and r is not kron:
            text += f" ({kron.job / r.job:.2f}x, rho {r.metrics.get('spearman', float('nan')):.4f})"
        parts.append(text)
    return "; ".join(parts) if parts else "no row ran"


@dataclass
class Report:
    """Everything the table, the markdown and the JSON are made of."""

    args: argparse.Namespace
    env: str
    started: float
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    epoch: float = 0.0
    accuracy: float = 0.0
    scored: int = 0
    reg: float = 0.0
    reg_source: str = ""
    layer_means: dict[str, float] = field(default_factory=dict)
    sign: float = 1.0
    runs: dict[str, Run] = field(default_factory=dict)
    left_out: str = ""  # rows left out on purpose (--skip-peer, --no-tf32-run)

    def config(self) -> str:
        a = self.args
        return (
            f"ResNet-9 width {a.width} ({self.scored:,} scored parameters), {a.n_train:,} train x "
            f"{a.n_query:,} queries of synthetic CIFAR-shaped data, trained one epoch ({self.epoch:.2f} s, "
            f"batch {a.batch}; query accuracy {self.accuracy:.3f}); damping {self.reg:.4e} for both "
            f"({self.reg_source}); torchfluence block_size {a.block}; kronfluence batches as noted. One "
            f"timed run per row after a warm-up on {min(a.warmup_train, a.n_train):,} x "
            f"{min(a.warmup_query, a.n_query):,}. Spearman: mean over queries, against kronfluence fp32's "
            f"scores (sign {self.sign:+.0f}); peak GiB: max_memory_allocated over the row, model and data "
            f"included. Script {time.perf_counter() - self.started:.0f} s."
        )

    def device_name(self) -> str:
        if self.args.device == "cuda":
            return torch.cuda.get_device_name(0).removeprefix("NVIDIA ")
        return "CPU"

    def failed(self) -> list[str]:
        return [name for name, run in self.runs.items() if run.error]

    def write(self, final: bool) -> None:
        """Writes --markdown and --json (also between rows, so that a cut-off script leaves its numbers);
        the final call also prints the markdown."""
        runs = list(self.runs.values())
        line, config = headline(runs), self.config()
        with contextlib.redirect_stdout(io.StringIO()):
            main_table = print_table(HEADERS, table(runs))
            details = detail_table(runs, self.runs)
            detail_text = print_table(DETAIL_HEADERS, details) if details else ""
        notes = [f"- {r.name}: " + "; ".join(
            ([f"{r.state()}: {r.error or r.unavailable or r.skipped}"] if not r.ran else []) + r.notes)
            for r in runs if r.notes or not r.ran]
        if self.left_out:
            notes.append(f"- left out on purpose: {self.left_out}")
        partial = "" if final else "(partial: written before the last row ended)\n\n"
        text = (
            f"## {self.device_name()}, end to end: EK-FAC fit + {self.args.n_train:,} x "
            f"{self.args.n_query:,} pairwise scores + top-k, torchfluence vs kronfluence 1.0.1 "
            f"(bench_gpu_e2e.py, {self.date})\n\n"
            f"{partial}{self.env}\n\n{config}\n\n"
            f"{main_table}\n\n" + ("\n".join(notes) + "\n\n" if notes else "")
            + (f"Details (agreement with kronfluence fp32; speed-ups on total s):\n\n{detail_text}\n"
               if detail_text else "")
        )
        if final:
            print("\n" + text)
        if self.args.markdown:
            Path(self.args.markdown).write_text(text)
        if self.args.json:
            record = {
                "headline": line if final else f"(partial) {line}",
                "failed": self.failed(),
                "environment": self.env,
                "args": {k: None if v == math.inf else v for k, v in vars(self.args).items()},
                "scored_parameters": self.scored,
                "query_accuracy": self.accuracy,
                "damping": self.reg,
                "damping_source": self.reg_source,
                "mean_eigenvalue_per_layer": self.layer_means,
                "sign": self.sign,
                "epoch_s": self.epoch,
                "runs": {name: run.record() for name, run in self.runs.items()},
                "left_out": self.left_out or None,
                "script_s": time.perf_counter() - self.started,
                "complete": final,
            }
            Path(self.args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")


# -- main -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: width 8, 512 train, 64 queries")
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-query", type=int, default=2_000)
    parser.add_argument("--width", type=int, default=64, help="ResNet-9 base width (64: the original)")
    parser.add_argument("--batch", type=int, default=512, help="batch of the timed training epoch")
    parser.add_argument(
        "--block", type=int, help="torchfluence block_size (default 1024 on cuda, 128 on cpu)"
    )
    parser.add_argument(
        "--query-chunk", type=int, default=0, help="torchfluence: queries per scoring call (0: all at once)"
    )
    parser.add_argument(
        "--peer-batch",
        type=int,
        help="kronfluence factor and training batch (default 1024 on cuda, 128 on cpu)",
    )
    parser.add_argument("--query-batch", type=int, default=1000, help="kronfluence query batch")
    parser.add_argument(
        "--peer-amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run kronfluence with its bf16 settings (default: on for cuda)",
    )
    parser.add_argument("--skip-peer", action="store_true", help="torchfluence only (the table says so)")
    parser.add_argument(
        "--one-pass-scores", choices=("bf16", "fp32"), default="bf16",
        help="scoring operands of the one-pass rows (default bf16)",
    )
    parser.add_argument(
        "--tf32-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the one-pass row with allow_tf32=True (an extra, last, when time is left)",
    )
    parser.add_argument("--reg", default="auto", help="damping for both: a number, or 'auto' (default)")
    parser.add_argument("--warmup-train", type=int, default=1024)
    parser.add_argument("--warmup-query", type=int, default=64)
    parser.add_argument(
        "--budget", type=float, help="seconds for the whole script (default 380 on cuda, none on cpu)"
    )
    parser.add_argument(
        "--extra-budget", type=float,
        help="seconds of the script by which the extra rows (TF32) must end (default: --budget)",
    )
    parser.add_argument("--markdown", help="write the tables to this file")
    parser.add_argument("--json", help="write the raw numbers to this file")
    args = parser.parse_args()
    if args.quick:
        args.width, args.n_train, args.n_query = 8, 512, 64
        args.warmup_train, args.warmup_query = 128, 16
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    args.block = args.block or (1024 if cuda else 128)
    args.peer_batch = args.peer_batch or (1024 if cuda else 128)
    args.peer_amp = cuda if args.peer_amp is None else args.peer_amp
    args.budget = args.budget if args.budget is not None else 380.0 if cuda else math.inf
    args.extra_budget = args.budget if args.extra_budget is None else min(args.extra_budget, args.budget)
    return args


def specs_of(args: argparse.Namespace) -> tuple[list[Spec], str]:
    """The rows in the order they run, and what was left out on purpose."""
    low = torch.bfloat16 if args.one_pass_scores == "bf16" else None
    suffix = f", {args.one_pass_scores} scores"
    specs, left_out = [], []
    if args.skip_peer:
        left_out.append("kronfluence (--skip-peer)")
    else:
        specs.append(Spec(KRON_FP32, peer=True))
        if args.peer_amp:
            specs.append(Spec(KRON_AMP, peer=True, amp=True))
        else:
            left_out.append(f"{KRON_AMP} (--peer-amp is off)")
    specs += [
        Spec(TFL_FP32, peer=False),
        Spec(TFL_ONE + suffix, peer=False, score_dtype=low, one_pass=True),
        Spec(TFL_LOW + suffix, peer=False, score_dtype=low, factor_dtype=torch.bfloat16,
             capture_dtype=torch.bfloat16, one_pass=True),
    ]
    if args.tf32_run:
        specs.append(
            Spec(TFL_TF32 + suffix, peer=False, score_dtype=low, one_pass=True, tf32=True, extra=True)
        )
    else:
        left_out.append(f"{TFL_TF32} (--no-tf32-run)")
    return specs, ", ".join(left_out)


def trained_model(
    args: argparse.Namespace, x: Tensor, y: Tensor, sync: Callable[[], None]
) -> tuple[nn.Module, float]:
    """ResNet-9 trained for one timed epoch (after two untimed steps on a copy), then frozen for scoring."""
    torch.manual_seed(0)
    model = resnet9(args.width).to(x.device)
    train_epochs(copy.deepcopy(model), x[: 2 * args.batch], y[: 2 * args.batch], batch=args.batch, sync=sync)
    epoch = train_epochs(model, x, y, batch=args.batch, sync=sync)
    return freeze_batchnorm(model), epoch


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    report = Report(args, environment(device), time.perf_counter())
    print(report.env, flush=True)
    specs, report.left_out = specs_of(args)
    peer_problem = "" if args.skip_peer else kronfluence_problem()
    if peer_problem:
        print(f"FAIL: {peer_problem}", flush=True)

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    x, y = synthetic_cifar(args.n_train, seed=1, device=device, signal=0.3)
    xq, yq = synthetic_cifar(args.n_query, seed=2, device=device, signal=0.3)
    model, report.epoch = trained_model(args, x, y, sync)
    with torch.no_grad():
        report.accuracy = float((model(xq).argmax(dim=1) == yq).float().mean())
    report.scored = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"{args.n_train} train x {args.n_query} queries; one epoch {report.epoch:.2f} s (batch "
        f"{args.batch}); query accuracy {report.accuracy:.3f}; ResNet-9 width {args.width}: "
        f"{report.scored:,} scored conv/linear parameters",
        flush=True,
    )

    ctx = Context(device, model, (x, y), (xq, yq), 0.0, args)
    nw, nqw = min(args.warmup_train, args.n_train), min(args.warmup_query, args.n_query)
    warm_train, warm_queries = (x[:nw], y[:nw]), (xq[:nqw], yq[:nqw])
    if args.reg == "auto":
        mean, report.layer_means = eigenvalue_means(ctx, warm_train)
        ctx.reg = 0.1 * mean
        report.reg_source = (
            f"0.1 x the mean corrected eigenvalue {mean:.3e}, from a fit on {nw} warm-up samples"
        )
        print(
            "mean eigenvalue per layer: " + ", ".join(f"{k} {v:.1e}" for k, v in report.layer_means.items())
        )
    else:
        ctx.reg, report.reg_source = float(args.reg), "--reg"
    report.reg = ctx.reg
    print(f"damping for both: {ctx.reg:.4e} ({report.reg_source})", flush=True)

    def run_row(spec: Spec, train: Data, queries: Data) -> Run:
        if spec.peer and peer_problem:
            return Run(spec, error=peer_problem)
        return (run_kronfluence if spec.peer else run_torchfluence)(ctx, spec, train, queries)

    # Warm-up: every row once on the subset; it also settles the sign convention. A row that fails
    # here (other than for memory) is not run again at full size.
    began = time.perf_counter()
    warm = {spec.name: run_row(spec, warm_train, warm_queries) for spec in specs}
    for name, run in warm.items():
        print(f"  warm-up {name}: {run.status()}", flush=True)
    kron_warm, ours_warm = warm.get(KRON_FP32), warm.get(TFL_FP32)
    if kron_warm and ours_warm and kron_warm.scores is not None and ours_warm.scores is not None:
        r = pearson(ours_warm.scores, kron_warm.scores, device)
        report.sign = 1.0 if r >= 0 else -1.0
        verdict = "the same convention" if r >= 0 else "opposite: kronfluence's scores are negated"
        print(f"sign (warm-up): Pearson(torchfluence influences, kronfluence scores) = {r:+.4f}: {verdict}")
    broken = {n: r for n, r in warm.items() if r.unavailable or (r.error and not is_oom_text(r.error))}
    del warm, kron_warm, ours_warm
    free_memory(device)
    print(f"warm-up: {time.perf_counter() - began:.1f} s", flush=True)

    for spec in specs:
        elapsed = time.perf_counter() - report.started
        if spec.name in broken:
            before = broken[spec.name]
            error = before.error if before.error == peer_problem else f"in the warm-up: {before.error}"
            run = Run(spec, unavailable=before.unavailable, error=error if before.error else "")
        else:
            budget = args.extra_budget if spec.extra else args.budget
            skip = why_skip(spec, specs, report.runs, elapsed, budget)
            run = Run(spec, skipped=skip) if skip else run_row(spec, ctx.train, ctx.queries)
        report.runs[spec.name] = run
        print(f"{spec.name}: {run.status()}", flush=True)
        if run.ran:
            compare(run, report.runs, device, report.sign)
        report.write(final=False)
    report.write(final=True)
    failed = report.failed()
    if failed:
        print(f"failed rows: {', '.join(failed)}", flush=True)
    return ROWS_FAILED if failed else 0


def is_oom_text(error: str) -> bool:
    return "out of memory" in error.lower() or "OutOfMemoryError" in error


if __name__ == "__main__":
    sys.exit(main())
