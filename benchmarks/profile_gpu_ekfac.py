"""Profile of EK-FAC fit and bf16 scoring on one GPU (ResNet-9, synthetic CIFAR-shaped data).

Prints wall time per stage and torch.profiler's top operators (self CUDA time and
self CPU time) for each, so that the stage that dominates is read, not guessed.

    python benchmarks/profile_gpu_ekfac.py [--n-train 10000] [--n-query 2000] [--width 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import torchfluence as tfl
from _resnet9 import freeze_batchnorm, resnet9, synthetic_cifar


def timed(what: str, fn):
    torch.cuda.synchronize()
    began = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    print(f"{what}: {time.perf_counter() - began:.2f} s", flush=True)
    return out


def profiled(what: str, fn, rows: int):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = timed(what + " (profiled)", fn)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-query", type=int, default=2000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=22)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = freeze_batchnorm(resnet9(args.width).to(device).eval())
    x, y = synthetic_cifar(args.n_train, 1, device)
    xq, yq = synthetic_cifar(args.n_query, 2, device)
    reg = 1e-5

    def build(tf32: bool = False):
        return tfl.EkfacInfluence(model, F.cross_entropy, reg, block_size=args.block, score_dtype=torch.bfloat16,
                                  allow_tf32=tf32)

    # Warm-up on a slice: handles, kernel selection.
    build().fit((x[:1024], y[:1024])).train_influences(xq[:64], yq[:64])
    im = timed("fit", lambda: build().fit((x, y)))
    timed("train_influences", lambda: im.train_influences(xq, yq))
    timed("prepared factors only", lambda: im._prepared_factors(xq, yq))
    im_tf32 = timed("fit tf32", lambda: build(tf32=True).fit((x, y)))
    timed("prepared factors only tf32", lambda: im_tf32._prepared_factors(xq, yq))
    del im_tf32
    small = slice(0, 4096)
    profiled("fit 4096", lambda: build().fit((x[small], y[small])), args.rows)
    im_small = build().fit((x[small], y[small]))
    profiled("train_influences 4096 x queries", lambda: im_small.train_influences(xq, yq), args.rows)


if __name__ == "__main__":
    main()
