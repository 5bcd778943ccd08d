"""What 16-bit factor operands (``factor_dtype=torch.bfloat16``) cost in fidelity.

EK-FAC (and K-FAC) are fitted twice on the same trained model and data, once with
float32 products, then with bf16 operands and float32 sums (``factor_dtype``), then
also with the model's passes under bf16 autocast (``capture_dtype``, kronfluence's AMP
setting); the scores are compared with the float32 fit's: mean and smallest per-query Spearman rank
correlation, top-10 overlap (helpful side), and the relative Frobenius error.

Workloads: the digits CNN (8 x 8 images, 1,000 training samples, 100 queries) and
the ResNet-9 at width 8 with BatchNorm on synthetic CIFAR-shaped data (2,000 x 32 x 32
training images, 100 queries).

Two routes of the bf16 products: "float32 results" rounds the same operands as a GPU
and sums in float32, so its numbers are those a GPU gives (up to summation order); on a
CPU with bf16 instructions (AVX512-BF16, AMX) the library's default there, "native bf16",
also runs under the name: oneDNN bf16 GEMMs whose results torch rounds to bf16
(:func:`torchfluence.precision.factor_matmul`). The seconds (fit + scores, one run, this
machine) are for the native route's speed-up on the CPU only; small models, no GPU claim.

    python benchmarks/bench_factor_dtype.py [--markdown FILE] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
import torchfluence as tfl  # noqa: E402
import torchfluence.precision as precision  # noqa: E402
from _resnet9 import synthetic_cifar, trained_resnet9  # noqa: E402
from _timing import environment, print_table  # noqa: E402

from tests.digits import cnn, digits, train  # noqa: E402


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman correlation of (n_query, n) scores (average ranks are not needed: ties are rare)."""
    ra = a.argsort(dim=1).argsort(dim=1).double()
    rb = b.argsort(dim=1).argsort(dim=1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    ia, ib = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return sum(len(set(ia[i].tolist()) & set(ib[i].tolist())) for i in range(len(a))) / (k * len(a))


VARIANTS = {  # the first is the reference
    "float32": {},
    "factor_dtype=bf16": {"factor_dtype": torch.bfloat16},
    "factor_dtype + capture_dtype=bf16": {"factor_dtype": torch.bfloat16, "capture_dtype": torch.bfloat16},
}


def workloads(quick: bool):
    torch.manual_seed(0)
    x, y, xt, yt = digits(300 if quick else 1000, 30 if quick else 100, dtype=torch.float32, image=True)[:4]
    yield "digits CNN", train(cnn(torch.float32), x, y, steps=200), x, y, xt, yt, 1e-3
    cpu = torch.device("cpu")
    n = 300 if quick else 2000
    x, y = synthetic_cifar(n, seed=0, device=cpu)
    xt, yt = synthetic_cifar(30 if quick else 100, seed=1, device=cpu)
    yield "ResNet-9 width 8", trained_resnet9(8, x, y, steps=20 if quick else 60), x, y, xt, yt, 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    native = precision.NATIVE_BF16_CPU
    routes = {"float32 results": False, **({"native bf16": True} if native else {})}
    rows = []
    for name, model, x, y, xt, yt, reg in workloads(args.quick):
        data = DataLoader(TensorDataset(x, y), batch_size=256)
        for cls in (tfl.EkfacInfluence, tfl.KfacInfluence):
            reference = None
            for label, options in VARIANTS.items():
                for route, on in routes.items() if options else [("", native)]:
                    precision.NATIVE_BF16_CPU = on  # read by factor_matmul at each call
                    began = time.perf_counter()
                    im = cls(model, F.cross_entropy, reg, fisher="exact", progress=False, **options).fit(data)
                    scores = im.influences(xt, yt, x, y)
                    seconds = f"{time.perf_counter() - began:.2f}"
                    if reference is None:
                        reference = scores
                        rows.append([name, cls.__name__, label, route, f"{len(x)} x {len(xt)}", "1", "1", "1", "0",
                                     seconds])
                        continue
                    a, b = reference, scores
                    rho = spearman_rows(a, b)
                    rows.append([name, cls.__name__, label, route, f"{len(x)} x {len(xt)}", f"{rho.mean():.4f}",
                                 f"{rho.min():.4f}", f"{top_overlap(a, b):.3f}",
                                 f"{float((a - b).norm() / a.norm()):.2e}", seconds])
                    print(rows[-1], flush=True)
    precision.NATIVE_BF16_CPU = native
    table = print_table(["workload", "solver", "setting", "bf16 route", "train x queries", "Spearman mean",
                         "Spearman min", "top-10 overlap", "rel. error", "fit + scores s"], rows)
    text = f"bf16 factor operands against the float32 fit ({environment(torch.device('cpu'))})\n\n{table}\n"
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
