"""Where an EK-FAC fit and its scoring spend their time on one GPU: the top operators of each stage.

The race's workload at a smaller size (ResNet-9, synthetic CIFAR-shaped data, BatchNorm
frozen; default 4,096 train x 500 queries at width 64) and its float32 configuration
(``EkfacInfluence(model, F.cross_entropy, reg, block_size=1024)``). Stages:

- fit factors: ``fit`` up to the eigenvalue correction: the capture pass (forward and
  backward with sampled labels), the activation and gradient covariances, their eigh;
- eigenvalue correction: the fit's second pass (per-sample gradients rotated into the
  eigenbasis, squared, summed) and what follows it in ``fit``;
- query preparation: the queries' gradients, preconditioned and laid out for scoring
  (``_prepared_factors``);
- scoring: ``train_influences`` against the prepared queries (one pass over the training
  data), or ``top_k(..., with_scores=True)`` with ``--scoring one-pass``.

After a warm-up on a slice, every stage is timed once without the profiler, then once
more under its own ``torch.profiler`` session (the boundaries synchronize the device).
Prints, per stage, one line

    stage <name>: <s> s (<s> s profiled, GPU busy <s> s); top self CUDA: <op> <ms> ms <pct>%; ...

(operators: the CPU-side ops by the self CUDA time of the kernels they launch, as a
percentage of the stage's kernel time), then the profiler's tables sorted by self CUDA
time (kernels and operators) and by self CPU time. With ``--device cpu`` (a check that
it runs) the lines rank self CPU time. A torchfluence without ``_corrected_eigenvalues``
reports the two fit stages as one ("fit"); one that refuses ``--factor-dtype`` or
``--score-dtype`` exits 3 with the reason.

    python benchmarks/profile_gpu_ekfac.py [--n-train 4096] [--n-query 500] [--width 64]
        [--score-dtype fp32|bf16] [--factor-dtype fp32|bf16] [--scoring matrix|one-pass]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
import torchfluence as tfl
from _resnet9 import freeze_batchnorm, resnet9, synthetic_cifar
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
FIT, CORRECTION, QUERIES, SCORING = "fit factors", "eigenvalue correction", "query preparation", "scoring"


def self_device_us(event) -> float:
    """Self CUDA time of a profiler entry in microseconds (torch >= 2.4 names it device time)."""
    value = getattr(event, "self_device_time_total", None)
    return float(value if value is not None else getattr(event, "self_cuda_time_total", 0.0))


class Stages:
    """Consecutive stages of a run, each timed (synchronizing at the boundaries) and, with `profiled`,
    recorded by its own torch.profiler session; :meth:`switch` ends one stage and starts the next."""

    def __init__(self, device: torch.device, profiled: bool) -> None:
        self.device, self.profiled = device, profiled
        self.seconds: dict[str, float] = {}
        self.averages: dict[str, object] = {}
        self._name: str | None = None
        self._prof = None
        self._began = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def switch(self, name: str | None) -> None:
        self.sync()
        now = time.perf_counter()
        if self._name is not None:
            self.seconds[self._name] = self.seconds.get(self._name, 0.0) + now - self._began
            if self._prof is not None:
                self._prof.stop()
                self.averages[self._name] = self._prof.key_averages()
                self._prof = None
        self._name = name
        if name is not None:
            if self.profiled:
                activities = [ProfilerActivity.CPU]
                if self.device.type == "cuda":
                    activities.append(ProfilerActivity.CUDA)
                self._prof = profile(activities=activities)
                self._prof.start()
            self.sync()
            self._began = time.perf_counter()


def run_stages(stages: Stages, build: Callable[[], tfl.EkfacInfluence], data, queries, scoring: str) -> bool:
    """Fit, prepare the queries and score, stage by stage. Returns whether the fit's stages were apart."""
    (x, y), (xq, yq) = data, queries
    im = build()
    split = hasattr(im, "_corrected_eigenvalues")
    if split:  # the fit's second pass starts the "eigenvalue correction" stage
        correct = im._corrected_eigenvalues

        def corrected(*args, **kwargs):
            stages.switch(CORRECTION)
            return correct(*args, **kwargs)

        im._corrected_eigenvalues = corrected
    stages.switch(FIT if split else "fit")
    im.fit((x, y))
    if split:
        del im._corrected_eigenvalues  # the class's method again
    stages.switch(QUERIES)
    prepared = im._prepared_factors(xq, yq)
    im._prepared_factors = lambda *_: prepared  # scoring alone, whatever this build caches
    stages.switch(SCORING)
    if scoring == "one-pass":
        im.top_k(xq, yq, k=10, with_scores=True)
    else:
        im.train_influences(xq, yq)
    stages.switch(None)
    return split


def top_operators(averages, cuda: bool, count: int) -> tuple[float, str]:
    """(the stage's kernel (or CPU) seconds, its `count` top operators as 'name ms pct%')."""
    if cuda:
        total = sum(self_device_us(e) for e in averages if e.device_type != DeviceType.CPU)
        ops = [(self_device_us(e), e.key) for e in averages if e.device_type == DeviceType.CPU]
    else:
        total = sum(e.self_cpu_time_total for e in averages)
        ops = [(float(e.self_cpu_time_total), e.key) for e in averages]
    ops = sorted((o for o in ops if o[0] > 0), reverse=True)[:count]
    text = ", ".join(f"{name[:48]} {us / 1e3:.1f} ms {100 * us / max(total, 1e-9):.0f}%" for us, name in ops)
    return total / 1e6, text or "no operators recorded"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--n-query", type=int, default=500)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--score-dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--factor-dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--scoring", choices=("matrix", "one-pass"), default="matrix")
    parser.add_argument("--top", type=int, default=5, help="operators named per stage in its line")
    parser.add_argument("--rows", type=int, default=15, help="rows of each profiler table")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = freeze_batchnorm(resnet9(args.width).to(device).eval())
    x, y = synthetic_cifar(args.n_train, 1, device)
    xq, yq = synthetic_cifar(args.n_query, 2, device)
    options: dict = {"block_size": args.block}
    for key in ("score_dtype", "factor_dtype"):
        if DTYPES[getattr(args, key)] is not None:
            options[key] = DTYPES[getattr(args, key)]

    def build() -> tfl.EkfacInfluence:
        return tfl.EkfacInfluence(model, F.cross_entropy, 1e-5, **options)

    try:
        build()
    except TypeError as error:
        print(f"not available in this build: {error}")
        return 3
    print(f"EkfacInfluence({', '.join(f'{k}={v}' for k, v in options.items())}); {args.n_train} train x "
          f"{args.n_query} queries, ResNet-9 width {args.width}; scoring: {args.scoring}; "
          f"{torch.cuda.get_device_name(device) if cuda else 'CPU'}, torch {torch.__version__}", flush=True)

    # Warm-up on a slice: handles, kernel selection, the profiler's own start-up.
    warm = slice(0, min(512, args.n_train))
    run_stages(Stages(device, profiled=True), build, (x[warm], y[warm]), (xq[:64], yq[:64]), args.scoring)
    timed = Stages(device, profiled=False)
    run_stages(timed, build, (x, y), (xq, yq), args.scoring)
    prof = Stages(device, profiled=True)
    split = run_stages(prof, build, (x, y), (xq, yq), args.scoring)
    if not split:
        print("this torchfluence has no _corrected_eigenvalues: the fit is one stage")

    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines = []
    for name, averages in prof.averages.items():
        busy, ops = top_operators(averages, cuda, args.top)
        where = f"GPU busy {busy:.2f} s" if cuda else f"CPU {busy:.2f} s"
        top = "top self CUDA" if cuda else "top self CPU"
        lines.append(f"stage {name}: {timed.seconds[name]:.2f} s ({prof.seconds[name]:.2f} s profiled, "
                     f"{where}); {top}: {ops}")
        print(f"\n== {name}: self {'CUDA' if cuda else 'CPU'} time")
        print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
        if cuda:
            print(f"== {name}: self CPU time")
            print(averages.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=70))
    print()
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
