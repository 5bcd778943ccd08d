"""psg_dot against the plain-PyTorch paths: time and peak memory.

One Linear layer (d_in = d_out = 512 by default) with captured activations
A (n, T, d_in) and output gradients D (n, T, d_out), scored against n_q query
matrices. Paths:

- ``psg_dot``: the fused kernel (full queries) and the low-rank form (rank 32);
- ``vmap + matmul``: torch.func per-sample gradients, 256 samples at a time,
  then a matmul with the queries (what an engine without the kernel does);
- ``einsum + matmul``: per-sample gradients formed from A and D by einsum, in
  the same blocks, then the matmul.

Every path is checked against the first before it is timed. Each runs in a
fresh process, so its peak resident memory above the inputs is its own.

    python benchmarks/bench_psg_dot.py [--quick] [--device cuda] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch
from torch.func import grad, vmap

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table  # noqa: E402

BLOCK = 256  # samples per materialised per-sample-gradient block in the plain paths
RANK = 32


def inputs(n_q: int, n: int, T: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n_q, d, d, generator=g)
    A = torch.randn(n, T, d, generator=g)
    D = torch.randn(n, T, d, generator=g).div_(T)  # in place: no freed temporary to hide later peaks
    U = torch.randn(n_q, d, RANK, generator=g).div_(RANK ** 0.5)
    V = torch.randn(n_q, d, RANK, generator=g)
    return Q, A, D, U, V


def run_psg(Q, A, D, U, V):
    from torchfluence.captured_scores import psg_dot

    return psg_dot(Q, A, D)


def run_low_rank(Q, A, D, U, V):
    from torchfluence.captured_scores import psg_dot

    return psg_dot((U, V), A, D)


def run_vmap(Q, A, D, U, V):
    W = torch.zeros(Q.shape[1], Q.shape[2], device=Q.device)

    def sample_loss(w, a, d):  # its gradient in w is sum_t d_t a_t^T, the layer's per-sample gradient
        return torch.einsum("to,oi,ti->", d, w, a)

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    Qf = Q.flatten(1)
    return torch.cat([Qf @ per_sample(W, A[s:s + BLOCK], D[s:s + BLOCK]).flatten(1).T
                      for s in range(0, A.shape[0], BLOCK)], dim=1)


def run_einsum(Q, A, D, U, V):
    Qf = Q.flatten(1)
    return torch.cat([Qf @ torch.einsum("nto,nti->noi", D[s:s + BLOCK], A[s:s + BLOCK]).flatten(1).T
                      for s in range(0, A.shape[0], BLOCK)], dim=1)


PATHS = {"psg_dot (full Q)": run_psg, f"psg_dot (rank {RANK} Q)": run_low_rank,
         "vmap + matmul": run_vmap, "einsum + matmul": run_einsum}


def child(name: str, shape: tuple, device: str, queue) -> None:
    """Times one path in this process; reports seconds, peak memory growth and the scores."""
    Q, A, D, U, V = (t.to(device) for t in inputs(*shape))
    fn = PATHS[name]
    small = tuple(t[:2] for t in (Q, A, D, U, V))
    fn(*small)  # warm-up (and the kernel library load) on a tiny slice
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    scores = fn(Q, A, D, U, V)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    queue.put((seconds, peak_mib, scores[:, :64].double().cpu().numpy().copy()))  # plain arrays cross processes safely


def measure(name: str, shape: tuple, device: str):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(name, shape, device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 2048 instead of 8192")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    n = 2048 if args.quick else 8192
    rows = []
    for T in (1, 64):
        shape = (256, n, T, 512)
        results = {name: measure(name, shape, args.device) for name in PATHS}
        reference = torch.from_numpy(results["einsum + matmul"][2])
        # The low-rank path scores other queries (U V^T), so it is checked against its own reference.
        Q, A, D, U, V = inputs(*shape)
        low_rank_ref = torch.einsum("qor,qir,nto,nti->qn", U.double(), V.double(), D[:64].double(), A[:64].double())
        plain = results["vmap + matmul"][0]
        for name, (seconds, peak, scores) in results.items():
            expected = low_rank_ref if "rank" in name else reference
            err = float((torch.from_numpy(scores) - expected).norm() / expected.norm())
            if err > 1e-4:
                raise AssertionError(f"{name} disagrees with the reference at T={T}: relative error {err:.1e}")
            # Useful work: the score GEMM (2 n_q n d^2) plus forming the gradients (2 n T d^2).
            flops = 2 * 256 * n * 512 * 512 + 2 * n * T * 512 * 512
            rows.append([f"256 x {n} x T={T} x 512^2", name, f"{seconds:.3f}", f"{plain / seconds:.1f}x",
                         f"{flops / seconds / 1e12:.2f}", f"{max(peak, 0):.0f}", f"{err:.1e}"])
            print(" | ".join(rows[-1]), flush=True)
    env = environment(torch.device(args.device))
    print(env)
    text = print_table(["n_q x n x T x d_out*d_in", "path", "seconds", "speed-up vs vmap", "TFLOP/s (full-rank work)",
                        "peak MiB above inputs", "rel. error"], rows)
    if args.markdown:
        Path(args.markdown).write_text(f"{env}\n\n{text}\n")


if __name__ == "__main__":
    main()
