"""Blocked influence assembly with streaming top-k: torchfluence vs plain PyTorch.

The plain-PyTorch path is what a user writes without the kernel: per block of
training rows, ``S @ G.T``, ``torch.topk`` on both ends, and a merge with the
running lists (cat + topk). Both paths are checked to agree before timing.

    python benchmarks/bench_influence_block.py [--device cuda] [--quick] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import torchfluence as tfl  # noqa: E402
from _timing import environment, median_seconds, print_table  # noqa: E402


def torch_stream_topk(S, G, block, k):
    """Plain PyTorch: matmul + topk per block + merge; returns (largest idx, smallest idx)."""
    n = S.shape[0]
    best_v = S.new_full((n, 0), 0.0)
    best_i = torch.empty(n, 0, dtype=torch.long, device=S.device)
    worst_v, worst_i = best_v.clone(), best_i.clone()
    for start in range(0, G.shape[0], block):
        scores = S @ G[start:start + block].T
        kk = min(k, scores.shape[1])
        v, i = torch.topk(scores, kk, dim=1)
        best_v, pick = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.shape[1] + kk), dim=1)
        best_i = torch.cat([best_i, i + start], 1).gather(1, pick)
        v, i = torch.topk(scores, kk, dim=1, largest=False)
        worst_v, pick = torch.topk(torch.cat([worst_v, v], 1), min(k, worst_v.shape[1] + kk), dim=1, largest=False)
        worst_i = torch.cat([worst_i, i + start], 1).gather(1, pick)
    return best_i, worst_i


def kernel_stream_topk(S, G, block, k):
    state = tfl.StreamingTopK(S.shape[0], k, device=S.device, dtype=S.dtype)
    for start in range(0, G.shape[0], block):
        state.update(S, G[start:start + block])
    res = state.result()
    return res.largest_indices, res.smallest_indices


def matmul_ceiling(device, dtype, n=8192):
    """Measured FLOP/s of one large torch matmul at `dtype` (the device's practical ceiling)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = median_seconds(lambda: a @ b, device, repeats=5, warmup=2)
    return 2 * n**3 / t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for smoke runs)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    if device.type == "cpu":
        # (n_query, n_train, p, block, k, dtype)
        cases = [(64, 50_000, 64, 8192, 10, torch.float32), (256, 50_000, 256, 8192, 10, torch.float32),
                 (512, 20_000, 1024, 4096, 10, torch.float32), (256, 20_000, 512, 4096, 100, torch.float32),
                 (128, 20_000, 512, 4096, 10, torch.float64)]
        if args.quick:
            cases = [(c[0], c[1] // 10, *c[2:]) for c in cases[:2]]
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # the kernel computes in true fp32
        cases = [(2000, 1_000_000, 64, 262_144, 10, torch.float32), (2000, 200_000, 512, 65_536, 10, torch.float32),
                 (2000, 200_000, 512, 65_536, 32, torch.float32), (4096, 100_000, 2048, 32_768, 10, torch.float32),
                 (2000, 200_000, 512, 65_536, 10, torch.bfloat16), (1024, 100_000, 512, 32_768, 10, torch.float64)]
        if args.quick:
            cases = cases[:2]

    ceilings = {}
    rows = []
    for n_query, n_train, p, block, k, dtype in cases:
        S = torch.randn(n_query, p, device=device, dtype=dtype)
        G = torch.randn(n_train, p, device=device, dtype=dtype)
        ref_best, ref_worst = torch_stream_topk(S.float() if dtype == torch.bfloat16 else S, G.float() if dtype == torch.bfloat16 else G, block, k)
        best, worst = kernel_stream_topk(S, G, block, k)
        # Random data has no exact ties; rounding may swap near-equal neighbours,
        # so correctness is judged on the set of indices per row.
        agree = (best.sort(1).values == ref_best.sort(1).values).float().mean().item()
        agree_w = (worst.sort(1).values == ref_worst.sort(1).values).float().mean().item()
        t_torch = median_seconds(lambda: torch_stream_topk(S, G, block, k), device)
        t_kernel = median_seconds(lambda: kernel_stream_topk(S, G, block, k), device)
        flops = 2 * n_query * n_train * p
        row = [f"{n_query}x{n_train}x{p}", str(block), str(k), str(dtype).replace("torch.", ""),
               f"{min(agree, agree_w):.4f}", f"{t_torch / t_kernel:.2f}x"]
        if device.type == "cuda":
            if dtype not in ceilings:
                ceilings[dtype] = matmul_ceiling(device, dtype)
            row[5:5] = [f"{t_torch * 1e3:.2f}", f"{t_kernel * 1e3:.2f}", f"{flops / t_kernel / 1e12:.1f}",
                        f"{ceilings[dtype] / 1e12:.1f}", f"{flops / t_kernel / ceilings[dtype]:.2f}"]
        rows.append(row)
    headers = ["n_query x n_train x p", "block", "k", "dtype", "top-k agreement"]
    if device.type == "cuda":
        headers += ["torch ms", "kernel ms", "kernel TFLOP/s", "matmul ceiling TFLOP/s", "of ceiling"]
    headers += ["speed-up vs torch"]
    print(environment(device))
    table = print_table(headers, rows)
    if args.markdown:
        args.markdown.write_text(f"{environment(device)}\n\n{table}\n")


if __name__ == "__main__":
    main()
