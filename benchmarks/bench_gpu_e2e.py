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

Configurations:

- kronfluence fp32: ``prepare_model`` on a copy; ``Analyzer(cpu=False)``;
  ``fit_all_factors(factor_args=FactorArguments())`` (EK-FAC, true Fisher with
  sampled labels, float32 covariances and lambdas, float64 eigendecomposition);
  ``compute_pairwise_scores(score_args=ScoreArguments(damping_factor=REG))``. Query
  batch 1000, as in kronfluence's CIFAR-10 example. The example leaves the factor
  and training batches to kronfluence's automatic search (4096, halved after every
  out-of-memory error), which costs minutes here, so both are fixed
  (``--peer-batch``, 1024 on a GPU). kronfluence writes factors and scores to files
  (a temporary directory); reading the scores back is part of the scores stage.
- kronfluence AMP: the same with the low-precision settings of kronfluence's
  CIFAR-10 example (``all_low_precision_factor_arguments`` and
  ``all_low_precision_score_arguments``, bfloat16: autocast, covariances,
  per-sample gradients, lambdas, preconditioning and scores).
- torchfluence fp32: ``EkfacInfluence(model, F.cross_entropy, REG,
  block_size=1024)`` (true Fisher with sampled labels), ``fit((x, y))``,
  ``train_influences(xq, yq)`` -> (n_query, n_train) float32, and
  ``top_k(xq, yq, k=10)`` on the fitted data; IEEE float32 products.
- torchfluence bf16: the same with ``score_dtype=torch.bfloat16`` (bf16 operands
  with float32 accumulation and results, in the scoring products only). A
  torchfluence without that keyword runs its float32 path, and the row says so.
- torchfluence bf16 + TF32: the same with ``allow_tf32=True``: the fit's float32
  products (covariances, EK-FAC rotations) and the query preconditioning on TF32
  tensor cores (about 1e-3 relative rounding, below the bf16 rounding of the
  scoring operands and far below the sampled-label noise of the factors). Its
  agreement with kronfluence fp32 is measured like every other row's.
  ``--no-tf32-run`` leaves it out.

Damping: REG is absolute and added to the EK-FAC eigenvalues by both
libraries. The default, ``--reg auto``, is 0.1 x the mean corrected eigenvalue
over all scored layers (kronfluence's own heuristic fraction, taken over the
whole model), measured once by an untimed torchfluence fit on the warm-up
subset and printed. A fixed 1e-3 is already twice the mean eigenvalue of a
width-16 ResNet-9 after the same epoch (5e-4), and the mean falls as the width
grows: at width 64 it would swamp most of the spectrum and pull both methods
towards a scaled gradient dot product. ``--reg 1e-3`` fixes the value instead.

Measurement: a warm-up runs every configuration on 1,024 training x 64 queries
(CUDA context, cuBLAS/cuDNN handles, kernel selection), then each runs once at
full size, peer and torchfluence alternating, every stage bracketed by
``torch.cuda.synchronize``. Stages: fit (factors), scores (the full matrix on
the device; for kronfluence through its files), top-k of that matrix
(kronfluence: ``torch.topk``; torchfluence: ``top_k_of_scores``, exact with ties
by lower index). Speed-ups compare fit + scores + top-k. ``--streamed-top-k``
also times torchfluence's streamed ``top_k`` (a second pass over the training
data that never holds the matrix) and checks it against the matrix's. After an out-of-memory error
a stage is run again with smaller batches (kronfluence: all halved;
torchfluence: ``block_size`` halved, down to 128) and the row says so; the
stage time is that of the attempt that ran through. Agreement with kronfluence
fp32: Pearson over all scores, the mean over queries of the Spearman rank
correlation (ranks on the device), and the overlap of the 10 most helpful
training points per query. Peak GPU memory is ``max_memory_allocated`` over a
run (reset before each; the model and data, ~0.7 GiB, included). Optional runs
(kronfluence AMP, torchfluence fp32) are skipped when their estimated time would
end past ``--budget`` seconds.

    python benchmarks/bench_gpu_e2e.py --device cuda [--markdown FILE] [--json FILE]
    python benchmarks/bench_gpu_e2e.py --device cpu --quick      # tiny sizes, to check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
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
TOP = 10
MIN_BLOCK = 128
KRON_FP32, KRON_AMP = "kronfluence fp32", "kronfluence AMP (bf16)"
TFL_FP32, TFL_BF16, TFL_TF32 = "torchfluence fp32", "torchfluence bf16", "torchfluence bf16 + TF32"
OWN_TOP = "top-10 overlap, top_k vs own matrix"
GIB = 2**30


# -- runs -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One configuration's run: stage seconds, peak memory, what it returned, how it agrees."""

    name: str
    stages: dict[str, float] = field(default_factory=dict)
    peak_gib: float | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    scores: Tensor | None = None  # (n_query, n_train) float32, kept on the CPU between runs
    top: Tensor | None = None  # (n_query, TOP) indices of the most helpful training points

    @property
    def job(self) -> float | None:
        """fit + scores + top-k (of the scored matrix) seconds."""
        if self.error or "fit" not in self.stages or "scores" not in self.stages:
            return None
        return self.stages["fit"] + self.stages["scores"] + self.stages.get("top-k", 0.0)

    def status(self) -> str:
        if self.error:
            return f"FAILED {self.error}"
        times = ", ".join(f"{k} {v:.2f} s" for k, v in self.stages.items())
        return times + ("" if self.peak_gib is None else f"; peak GPU memory {self.peak_gib:.1f} GiB")

    def record(self) -> dict:
        return {
            "stages_s": self.stages,
            "fit_plus_scores_s": self.job,
            "peak_gpu_gib": self.peak_gib,
            "error": self.error or None,
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
    except Exception as error:
        run.error = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        traceback.print_exc()
    if ctx.cuda:
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


# -- kronfluence ------------------------------------------------------------------------------------


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


def run_kronfluence(
    ctx: Context, name: str, amp: bool, train: tuple[Tensor, Tensor], queries: tuple[Tensor, Tensor]
) -> Run:
    args, run = ctx.args, Run(name)
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
        factor_args, score_args = kronfluence_arguments(amp, ctx.reg)
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
        run.scores, run.top = scores.float(), top.cpu()

    attempt(ctx, run, body)
    run.notes.insert(0, "batches: factors {factors}, queries {queries}, train {train}".format(**size))
    return run


# -- torchfluence -----------------------------------------------------------------------------------


def ekfac(
    ctx: Context, score_dtype: torch.dtype | None, block: int, tf32: bool = False
) -> tuple[tfl.EkfacInfluence, str]:
    """EkfacInfluence with `score_dtype`; a torchfluence without that keyword runs its float32 path.

    `tf32`: ``allow_tf32=True``, TF32 tensor cores for the float32 products of the fit
    (covariances, EK-FAC rotations) and the query preconditioning.
    """
    extra = {"allow_tf32": True} if tf32 else {}
    if score_dtype is None:
        return tfl.EkfacInfluence(ctx.model, F.cross_entropy, ctx.reg, block_size=block, **extra), ""
    try:
        im = tfl.EkfacInfluence(
            ctx.model, F.cross_entropy, ctx.reg, block_size=block, score_dtype=score_dtype, **extra
        )
        return im, ""
    except TypeError as error:
        if "score_dtype" not in str(error):
            raise
    note = f"this torchfluence takes no score_dtype: ran its float32 path instead of {score_dtype}"
    return tfl.EkfacInfluence(ctx.model, F.cross_entropy, ctx.reg, block_size=block, **extra), note


def chunks(n: int, size: int) -> list[slice]:
    size = n if size <= 0 else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def run_torchfluence(
    ctx: Context,
    name: str,
    score_dtype: torch.dtype | None,
    train: tuple[Tensor, Tensor],
    queries: tuple[Tensor, Tensor],
    tf32: bool = False,
) -> Run:
    (x, y), (xq, yq) = train, queries
    parts = chunks(len(xq), ctx.args.query_chunk)
    run = Run(name)
    state: dict = {"block": ctx.args.block}

    def shrink() -> str | None:
        if state["block"] <= MIN_BLOCK:
            return None
        state["block"] //= 2
        if "im" in state:  # fitted: the smaller blocks apply to the queries and the scoring
            state["im"].block_size = state["block"]
        return f"out of memory at block_size {2 * state['block']}: retried at {state['block']}"

    def fit() -> str:
        state.pop("im", None)
        im, note = ekfac(ctx, score_dtype, state["block"], tf32)
        im.fit((x, y))
        state["im"] = im
        return note

    def scores() -> Tensor:
        pieces = [state["im"].train_influences(xq[p], yq[p]) for p in parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def streamed_top_k() -> Tensor:
        return torch.cat([state["im"].top_k(xq[p], yq[p], k=TOP).helpful_indices for p in parts])

    def body() -> None:
        fit_s, note = shrinking(ctx, fit, shrink, run.notes)
        run.notes += [note] if note else []
        scores_s, matrix = shrinking(ctx, scores, shrink, run.notes)
        # The top-k of the matrix just scored (exact, ties by lower index), as kronfluence's
        # row ranks its own matrix; the streamed top_k is a second pass over the training data.
        top_s, top = ctx.timed(lambda: tfl.top_k_of_scores(matrix, TOP).largest_indices)
        run.stages = {"fit": fit_s, "scores": scores_s, "top-k": top_s}
        if ctx.args.streamed_top_k:
            streamed_s, streamed = shrinking(ctx, streamed_top_k, shrink, run.notes)
            run.stages["streamed top-k"] = streamed_s
            # top_k ranks the same scores as the matrix: a check of the streamed path.
            run.metrics[OWN_TOP] = overlap(streamed, top)
        run.scores, run.top = matrix.float().cpu(), top.cpu()

    attempt(ctx, run, body)
    state.clear()  # the fitted model, also after a failure
    free_memory(ctx.device)
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
    memory = torch.cuda.get_device_properties(device).total_memory / GIB
    flags = (
        f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32} "
        "(torch's defaults, left alone; torchfluence's float32 products are IEEE)"
    )
    name = torch.cuda.get_device_name(device)
    return f"device: {name} ({memory:.0f} GiB), driver {driver}; {libraries}; {flags}"


# -- report -----------------------------------------------------------------------------------------

HEADERS = [
    "run",
    "fit s",
    "scores s",
    "top-k s",
    "fit + scores + top-k s",
    "epochs",
    "vs kronfluence fp32",
    "vs kronfluence AMP",
    "Pearson",
    "Spearman",
    "top-10 overlap",
    "peak GiB",
    "note",
]


def seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f}" if s < 100 else f"{s:.0f}"


def speedup(base: Run | None, run: Run) -> str:
    if base is None or base.job is None or run.job is None:
        return "-"
    return "1.0x" if base is run else f"{base.job / run.job:.1f}x"


def metric(run: Run, key: str, reference: Run | None) -> str:
    if run is reference:
        return "reference" if key == "pearson" else "-"
    return f"{run.metrics[key]:.4f}" if key in run.metrics else "-"


def table(epoch: float, runs: dict[str, Run], batch: int) -> list[list[str]]:
    kron, amp = runs.get(KRON_FP32), runs.get(KRON_AMP)
    rows = [
        ["one epoch of training", "-", "-", "-", seconds(epoch), "1.0"] + ["-"] * 6 + [f"fp32, batch {batch}"]
    ]
    for name in (KRON_FP32, KRON_AMP, TFL_FP32, TFL_BF16, TFL_TF32):
        if name not in runs:
            continue
        run = runs[name]
        note = "; ".join(run.notes + ([f"FAILED: {run.error}"] if run.error else []))
        rows.append(
            [
                name,
                seconds(run.stages.get("fit")),
                seconds(run.stages.get("scores")),
                seconds(run.stages.get("top-k")),
                seconds(run.job),
                f"{run.job / epoch:.1f}" if run.job else "-",
                speedup(kron, run),
                speedup(amp, run),
                metric(run, "pearson", kron),
                metric(run, "spearman", kron),
                metric(run, "top10", kron),
                "-" if run.peak_gib is None else f"{run.peak_gib:.1f}",
                note.replace("|", "/"),
            ]
        )
    return rows


def headline(epoch: float, runs: dict[str, Run]) -> str:
    """One line: torchfluence bf16 against both kronfluence rows, its agreement, the epoch."""
    ours, kron, amp = runs.get(TFL_BF16), runs.get(KRON_FP32), runs.get(KRON_AMP)
    if ours is None or ours.job is None:
        why = ours.error if ours else "skipped"
        return f"torchfluence bf16 did not run through ({why}); one epoch {epoch:.1f} s"
    parts = [f"torchfluence bf16 fit+scores+top-k {ours.job:.1f} s ({ours.job / epoch:.1f} epochs)"]
    for base in (kron, amp):
        if base is not None and base.job is not None:
            parts.append(f"{base.job / ours.job:.1f}x vs {base.name} ({base.job:.1f} s)")
        elif base is not None:
            parts.append(f"{base.name} failed")
    if "pearson" in ours.metrics:
        parts.append(
            "vs kronfluence fp32: Pearson {pearson:.4f}, Spearman {spearman:.4f}, top-10 {top10:.2f}".format(
                **ours.metrics
            )
        )
    tf32 = runs.get(TFL_TF32)
    if tf32 is not None and tf32.job is not None:
        vs = f", {kron.job / tf32.job:.1f}x vs {kron.name}" if kron is not None and kron.job else ""
        parts.append(f"{TFL_TF32} {tf32.job:.1f} s{vs}, Pearson {tf32.metrics.get('pearson', float('nan')):.4f}")
    return "; ".join(parts) + f"; one epoch {epoch:.1f} s"


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
    parser.add_argument("--skip-peer", action="store_true", help="torchfluence only")
    parser.add_argument(
        "--tf32-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run torchfluence bf16 with allow_tf32=True (TF32 fit and query preconditioning)",
    )
    parser.add_argument(
        "--streamed-top-k",
        action="store_true",
        help="also time torchfluence's streamed top_k (a second pass over the training data)",
    )
    parser.add_argument("--reg", default="auto", help="damping for both: a number, or 'auto' (default)")
    parser.add_argument("--warmup-train", type=int, default=1024)
    parser.add_argument("--warmup-query", type=int, default=64)
    parser.add_argument(
        "--budget", type=float, help="seconds for the whole script (default 380 on cuda, none on cpu)"
    )
    parser.add_argument("--markdown", help="write the table to this file")
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
    return args


def trained_model(
    args: argparse.Namespace, x: Tensor, y: Tensor, sync: Callable[[], None]
) -> tuple[nn.Module, float]:
    """ResNet-9 trained for one timed epoch (after two untimed steps on a copy), then frozen for scoring."""
    torch.manual_seed(0)
    model = resnet9(args.width).to(x.device)
    train_epochs(copy.deepcopy(model), x[: 2 * args.batch], y[: 2 * args.batch], batch=args.batch, sync=sync)
    epoch = train_epochs(model, x, y, batch=args.batch, sync=sync)
    return freeze_batchnorm(model), epoch


def estimated_seconds(name: str, done: dict[str, Run]) -> float | None:
    """Rough time of an optional run from the runs already done (None: no basis)."""
    if name == KRON_AMP and KRON_FP32 in done and done[KRON_FP32].job:
        return 0.6 * done[KRON_FP32].job  # kronfluence's README: 36 s with AMP against 106 s without
    if name == TFL_TF32 and TFL_BF16 in done and done[TFL_BF16].job:
        return done[TFL_BF16].job  # at most as long as the IEEE float32 fit
    if name == TFL_FP32 and TFL_BF16 in done and done[TFL_BF16].job:
        run = done[TFL_BF16]
        return run.stages["fit"] + 5 * (run.stages["scores"] + run.stages.get("streamed top-k", 0.0))
    return None


def compare(run: Run, runs: dict[str, Run], device: torch.device, sign: float) -> None:
    """Agreement of a finished run with kronfluence fp32 (and of bf16 with fp32 scoring)."""
    kron = runs.get(KRON_FP32)
    if kron is not None and run is not kron:
        agree(run, kron, device, sign)
    if OWN_TOP in run.metrics:
        run.notes.append(f"streamed top_k vs top-10 of own matrix: {run.metrics[OWN_TOP]:.3f}"
                         f" ({run.stages['streamed top-k']:.2f} s)")
    bf16, fp32 = runs.get(TFL_BF16), runs.get(TFL_FP32)
    if run in (bf16, fp32) and bf16 is not None and fp32 is not None:
        if bf16.scores is not None and fp32.scores is not None:
            bf16.metrics["pearson vs torchfluence fp32"] = r = pearson(bf16.scores, fp32.scores, device)
            bf16.metrics["spearman vs torchfluence fp32"] = rho = spearman(bf16.scores, fp32.scores, device)
            bf16.notes.append(f"vs torchfluence fp32: Pearson {r:.4f}, Spearman {rho:.4f}")


@dataclass
class Report:
    """Everything the table, the markdown and the JSON are made of."""

    args: argparse.Namespace
    env: str
    started: float
    epoch: float = 0.0
    accuracy: float = 0.0
    scored: int = 0
    reg: float = 0.0
    reg_source: str = ""
    layer_means: dict[str, float] = field(default_factory=dict)
    sign: float = 1.0
    runs: dict[str, Run] = field(default_factory=dict)

    def config(self) -> str:
        a = self.args
        return (
            f"ResNet-9 width {a.width} ({self.scored:,} scored parameters), {a.n_train} train x {a.n_query} "
            f"queries of synthetic CIFAR-shaped data (query accuracy {self.accuracy:.3f} after the epoch); "
            f"damping {self.reg:.4e} for both ({self.reg_source}); torchfluence block_size {a.block}; "
            "kronfluence batches as noted. Speed-ups and epochs compare fit + scores + top-k; Pearson, Spearman "
            f"(mean per query) and top-10 overlap are with kronfluence fp32 (sign {self.sign:+.0f}). Script "
            f"{time.perf_counter() - self.started:.0f} s."
        )

    def write(self, final: bool) -> None:
        """Writes --markdown and --json (also between runs, so that a cut-off script leaves its numbers);
        the final call also prints the table."""
        line, config = headline(self.epoch, self.runs), self.config()
        rows = table(self.epoch, self.runs, self.args.batch)
        if final:
            print(f"\n{self.env}\n{config}\n\n{line}\n")
            text = print_table(HEADERS, rows)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                text = print_table(HEADERS, rows)
        partial = "" if final else "(partial: written before the last run ended)\n\n"
        if self.args.markdown:
            title = (
                "## EK-FAC factors + pairwise scores + top-k on one GPU: torchfluence vs kronfluence 1.0.1"
            )
            Path(self.args.markdown).write_text(
                f"{title}\n\n{partial}{line}\n\n{text}\n\n{self.env}\n\n{config}\n"
            )
        if self.args.json:
            record = {
                "headline": line if final else f"(partial) {line}",
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
                "script_s": time.perf_counter() - self.started,
                "complete": final,
            }
            Path(self.args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    report = Report(args, environment(device), time.perf_counter())
    print(report.env, flush=True)
    peer = not args.skip_peer
    if peer:
        try:
            import kronfluence  # noqa: F401
        except ImportError:
            print("kronfluence is not installed: torchfluence only", flush=True)
            peer = False

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

    configs: list[tuple[str, Callable[[tuple[Tensor, Tensor], tuple[Tensor, Tensor]], Run]]] = []
    if peer:
        configs.append((KRON_FP32, lambda t, q: run_kronfluence(ctx, KRON_FP32, False, t, q)))
    configs.append((TFL_BF16, lambda t, q: run_torchfluence(ctx, TFL_BF16, torch.bfloat16, t, q)))
    if args.tf32_run:
        configs.append((TFL_TF32, lambda t, q: run_torchfluence(ctx, TFL_TF32, torch.bfloat16, t, q, tf32=True)))
    if peer and args.peer_amp:
        configs.append((KRON_AMP, lambda t, q: run_kronfluence(ctx, KRON_AMP, True, t, q)))
    configs.append((TFL_FP32, lambda t, q: run_torchfluence(ctx, TFL_FP32, None, t, q)))

    # Warm-up: every configuration once on the subset; it also settles the sign convention.
    began = time.perf_counter()
    warm = {name: fn(warm_train, warm_queries) for name, fn in configs}
    for name, run in warm.items():
        print(f"  warm-up {name}: {run.status()}", flush=True)
    ours = next((warm[n] for n in (TFL_BF16, TFL_FP32) if warm[n].scores is not None), None)
    if peer and warm[KRON_FP32].scores is not None and ours is not None:
        r = pearson(ours.scores, warm[KRON_FP32].scores, device)
        report.sign = 1.0 if r >= 0 else -1.0
        verdict = (
            "the same convention" if r >= 0 else "opposite conventions: kronfluence's scores are negated"
        )
        print(f"sign (warm-up): Pearson(torchfluence influences, kronfluence scores) = {r:+.4f}: {verdict}")
    del warm, ours
    free_memory(device)
    print(f"warm-up: {time.perf_counter() - began:.1f} s", flush=True)

    for name, fn in configs:
        estimate, elapsed = estimated_seconds(name, report.runs), time.perf_counter() - report.started
        if name in (KRON_AMP, TFL_FP32, TFL_TF32) and estimate is not None and elapsed + estimate > args.budget:
            print(
                f"skipped {name}: ~{estimate:.0f} s more, {elapsed:.0f} s elapsed, budget {args.budget:.0f} s"
            )
            continue
        run = report.runs[name] = fn(ctx.train, ctx.queries)
        print(f"{name}: {run.status()}", flush=True)
        compare(run, report.runs, device, report.sign)
        report.write(final=False)
    report.write(final=True)


if __name__ == "__main__":
    main()
