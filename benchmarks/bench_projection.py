"""Projecting per-sample gradients: the SJLT kernel against dense projections. Throughput in examples/s.

A block of n per-sample gradients (n, p) is projected to (n, k). Paths:

- ``SJLT kernel (s)``: :class:`torchfluence.SparseJLProjector`, the compiled kernel that
  regenerates its s non-zeros per column from a hash (n p s additions, no matrix in memory);
- ``dense mm``: ``G @ M.T`` with a materialised (k, p) Gaussian float32 matrix (generated
  once, not timed; skipped when it would need more than ``--max-dense-gb``);
- ``on-the-fly Rademacher``: the idea of TRAK's ``fast_jl``, in plain torch: the +-1/sqrt(k)
  matrix is never stored but regenerated from a seed for every block of columns with a
  seeded ``torch.Generator``, then multiplied in (2 n p k flops plus k p random draws per call).

Every path is checked first, on the block's first rows, against a float64 computation
of the same matrix (for the SJLT, a sparse matrix built from the hash's NumPy twin in
``torchfluence.reference``); then each is timed (median of ``--repeats`` calls after
the checked call, which is the warm-up; CUDA events on GPU). A path whose first call takes
more than ``--slow-seconds`` is reported from that one call.

    python benchmarks/bench_projection.py [--quick] [--device cuda] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import torchfluence  # noqa: E402
from _timing import environment, median_seconds, print_table  # noqa: E402
from torchfluence import reference  # noqa: E402

CHECK_ROWS = 4
# float32 sums of up to p terms against float64: the error grows like sqrt(p) u |terms|,
# below 1e-4 of the result's norm for p <= 1e7 (u = 6e-8); a wrong matrix is off by O(1).
CHECK_RTOL = 1e-4


def sjlt_path(p: int, k: int, s: int, seed: int):
    projector = torchfluence.SparseJLProjector(p, k, s=s, seed=seed)

    def run(G):
        return projector.project(G)

    def check(G):
        buckets, signs = reference.sjlt_codes_reference(seed, range(p), k, s)
        cols = torch.arange(p).reshape(-1, 1).expand(p, s)
        M = torch.sparse_coo_tensor(torch.stack([buckets.reshape(-1), cols.reshape(-1)]),
                                    signs.reshape(-1) / math.sqrt(s), (k, p), check_invariants=True)
        return (M @ G[:CHECK_ROWS].double().cpu().T).T

    return run, check


def dense_path(p: int, k: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(k, p, generator=gen).div_(math.sqrt(k)).to(device)

    def run(G):
        return G @ M.T

    def check(G):
        return G[:CHECK_ROWS].double() @ M.double().T

    return run, check


def on_the_fly_path(p: int, k: int, seed: int, device: torch.device):
    chunk = max(1, 2**24 // k)  # columns per regenerated block: 64 MiB of float32 entries

    def block(i: int, c0: int, dtype: torch.dtype) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        bits = torch.randint(0, 2, (min(chunk, p - c0), k), generator=gen, device=device, dtype=dtype)
        return bits.mul_(2).sub_(1)

    def run(G):
        out = torch.zeros(G.shape[0], k, dtype=G.dtype, device=device)
        for i, c0 in enumerate(range(0, p, chunk)):
            out.addmm_(G[:, c0:c0 + chunk], block(i, c0, G.dtype))
        return out.div_(math.sqrt(k))

    def check(G):
        g = G[:CHECK_ROWS].double()
        out = torch.zeros(CHECK_ROWS, k, dtype=torch.float64, device=device)
        for i, c0 in enumerate(range(0, p, chunk)):
            out += g[:, c0:c0 + chunk] @ block(i, c0, G.dtype).double()  # +-1: exact in any dtype
        return out / math.sqrt(k)

    return run, check


def checked_seconds(name: str, run, check, G, device: torch.device) -> float:
    """Checks one call of `run` against float64 and returns its wall time (it is also the warm-up)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    got = run(G)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    got = got[:CHECK_ROWS].double().cpu()
    want = check(G).cpu()
    err = float((got - want).norm() / want.norm())
    if not err <= CHECK_RTOL:
        raise AssertionError(f"{name}: relative error {err:.2e} against float64 is above {CHECK_RTOL}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=256, help="examples per block")
    parser.add_argument("--p", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--k", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--s", type=int, nargs="+", default=[1, 4], help="SJLT non-zeros per column")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slow-seconds", type=float, default=10.0,
                        help="a path whose checked first call takes longer is timed by that call alone")
    parser.add_argument("--max-dense-gb", type=float, default=2.0)
    parser.add_argument("--no-on-the-fly", action="store_true", help="skip the (slow) regenerated dense path")
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.p, args.k, args.n = [100_000], [1024], 128
    device = torch.device(args.device)

    rows = []
    for p in args.p:
        G = torch.randn(args.n, p, generator=torch.Generator().manual_seed(p)).to(device)
        for k in args.k:
            paths = {f"SJLT kernel (s={s})": sjlt_path(p, k, s, 0) for s in args.s}
            dense_gb = 4 * k * p / 1e9
            if dense_gb <= args.max_dense_gb:
                paths["dense mm (materialised Gaussian)"] = dense_path(p, k, 0, device)
            if not args.no_on_the_fly:
                paths["on-the-fly Rademacher (fast_jl idea)"] = on_the_fly_path(p, k, 0, device)
            timings = {}
            for name, (run, check) in paths.items():
                first = checked_seconds(name, run, check, G, device)
                if first > args.slow_seconds:  # one call is the measurement: repeats would take minutes
                    timings[name] = (first, 1)
                else:
                    t = median_seconds(lambda run=run: run(G), device, repeats=args.repeats, warmup=0)  # noqa: B023
                    timings[name] = (t, args.repeats)
            base = timings.get("dense mm (materialised Gaussian)", (None,))[0]
            for name, (t, runs) in timings.items():
                rows.append([f"{p:,}", str(k), name, f"{t * 1e3:,.1f}", str(runs), f"{args.n / t:,.0f}",
                             f"{base / t:.1f}x" if base else "-"])
            if base is None:
                rows.append([f"{p:,}", str(k), "dense mm (materialised Gaussian)",
                             f"skipped: the matrix needs {dense_gb:.1f} GB", "-", "-", "-"])
    print(environment(device) + f"; n = {args.n} examples per block")
    headers = ["p", "k", "path", "ms per block (median)", "runs", "examples/s", "vs dense mm"]
    table = print_table(headers, rows)
    if args.markdown:
        header = environment(device) + f"; n = {args.n} examples per block"
        args.markdown.write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
