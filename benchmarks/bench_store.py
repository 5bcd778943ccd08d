"""GradientStore throughput: build (training examples/s) and top-k (queries x examples/s).

Two models on synthetic data: an MLP 784-256-256-10 (~270k parameters) and a
ResNet-ish conv net on 3x16x16 images (two residual blocks, ~77k parameters).
Each is stored under SJLT projections of two sizes and a Kronecker projection:

- SJLT: ``SparseJLProjector(p, k)`` over the whole gradient (s = 4), each
  layer's per-sample gradients formed in pieces and added into the sketch;
- Kronecker: ``KroneckerProjection(16, 16)`` (LoGra), each layer's inputs and
  output gradients projected, no per-sample gradient formed.

Before timing, each store is checked: its first block equals the projected
gradients of a GradientSimilarity solver with the same projector, rounded to
float16, and its scores and top-k values equal float64 products of the stored
values up to the float32 summation bound. Timed: one build (float16 storage,
Fisher summed) after an untimed one-block warm-up build, and the median of 3
``store.top_k`` calls for n_q queries (k = 10, gradient similarity and
Fisher-preconditioned; the Cholesky factor of F + lambda I is made on the
untimed first call and reused).

    python benchmarks/bench_store.py [--n-train 2048] [--n-query 256] [--threads 2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
import torchfluence as tfl  # noqa: E402
from _timing import environment, median_seconds, print_table  # noqa: E402

LOSS = F.cross_entropy


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), Block(32),
                         nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.ReLU(), Block(48),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48 * 4, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def check(store: tfl.GradientStore, model: nn.Module, projector, x: Tensor, y: Tensor, xq: Tensor, yq: Tensor,
          block_size: int) -> None:
    """The stored rows and the top-k scores are right (see the module's docstring)."""
    solver = tfl.GradientSimilarity(model, LOSS, projector=projector)
    first = solver.grads(x[:block_size], y[:block_size])
    assert torch.equal(store.gradients[:block_size], first.half()), "stored rows differ from the projected gradients"
    q = store.query_gradients(model, LOSS, xq[:8], yq[:8])
    s = q.float()
    g = store.gradients.double()
    exact = s.double() @ g.T
    bound = 1.01 * (s.shape[1] + 2) * 2.0**-24 * (s.double().abs() @ g.abs().T)
    assert bool(((store.scores(q).double() - exact).abs() <= bound).all()), "scores beyond the float32 bound"
    top = store.top_k(q, k=10)
    assert bool(((top.helpful_values.double() - exact.sort(1, descending=True).values[:, :10]).abs()
                 <= bound.max(1, keepdim=True).values).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--n-query", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    settings = {
        "MLP 784-256-256-10": (mlp, (1, 28, 28), [("SJLT k=4096", 4096), ("SJLT k=768", 768),
                                                   ("Kronecker 16x16/layer", (16, 16))]),
        "ResNet-ish conv, 3x16x16": (resnet, (3, 16, 16), [("SJLT k=4096", 4096), ("SJLT k=1536", 1536),
                                                         ("Kronecker 16x16/layer", (16, 16))]),
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model_name, (make, shape, projections) in settings.items():
            torch.manual_seed(0)
            model = make().eval()
            p = sum(q.numel() for q in model.parameters())
            x = torch.randn(args.n_train, *shape, generator=gen)
            y = torch.randint(0, 10, (args.n_train,), generator=gen)
            xq = torch.randn(args.n_query, *shape, generator=gen)
            yq = torch.randint(0, 10, (args.n_query,), generator=gen)
            for projection_name, spec in projections:
                projector = (tfl.SparseJLProjector(p, spec, seed=0) if isinstance(spec, int)
                             else tfl.KroneckerProjection(*spec, seed=0))
                path = Path(folder) / f"{model_name}-{projection_name}".replace(" ", "_").replace("/", "_")
                # Warm-up (lazy imports, first captures, allocator): a one-block store, not timed.
                tfl.GradientStore.build(model, LOSS, (x[:args.block_size], y[:args.block_size]), projector,
                                        path.with_name(path.name + "-warmup"), block_size=args.block_size,
                                        progress=False)
                t0 = time.perf_counter()
                store = tfl.GradientStore.build(model, LOSS, (x, y), projector, path, block_size=args.block_size,
                                                progress=False)
                build = time.perf_counter() - t0
                check(store, model, projector, x, y, xq, yq, args.block_size)
                t0 = time.perf_counter()
                queries = store.query_gradients(model, LOSS, xq, yq)
                query_time = time.perf_counter() - t0
                cpu = torch.device("cpu")
                plain = median_seconds(lambda: store.top_k(queries, k=10), cpu, repeats=3)
                preconditioned = median_seconds(lambda: store.top_k(queries, k=10, regularization=1e-3), cpu,
                                                repeats=3)
                pairs = args.n_query * args.n_train
                rows.append([model_name, f"{p:,}", projection_name, str(store.k), f"{args.n_train / build:,.0f}",
                             f"{args.n_query / query_time:,.0f}", f"{pairs / plain:.3g}",
                             f"{pairs / preconditioned:.3g}",
                             f"{(path / 'gradients.bin').stat().st_size / 2**20:.1f}"])
                print(" | ".join(rows[-1]), flush=True)
    env = environment(torch.device("cpu"))
    about = (f"n_train {args.n_train}, n_query {args.n_query}, block size {args.block_size}, float16 storage, "
             "Fisher summed during the build (float64), top-k k = 10; build includes the Fisher; "
             "queries/s: projected query gradients from the model; top-k rates are queries x training examples "
             "per second scored against the memory-mapped file (page cache warm)")
    print(env)
    print(about)
    text = print_table(["model", "params", "projection", "k", "build examples/s", "query grads/s",
                        "top-k (similarity) q x ex/s", "top-k ((F + 1e-3 I)^-1) q x ex/s", "file MiB"], rows)
    if args.markdown:
        Path(args.markdown).write_text(env + "\n\n" + about + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
