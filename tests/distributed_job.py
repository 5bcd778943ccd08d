"""One influence job, run by tests/test_distributed.py in 1 process and under torchrun in 2 and 3.

``python tests/distributed_job.py OUT_DIR`` (under torchrun) writes each rank's
results to ``OUT_DIR/rank{r}.safetensors``; :func:`run_job` returns them for the
one-process run. Every process builds the same model and data from fixed seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_TRAIN, N_TEST, BLOCK = 203, 7, 16  # 13 blocks, the last one short: uneven shares for 2 and 3 processes
K = 5


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)).double().eval()
    x = torch.randn(N_TRAIN + N_TEST, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (N_TRAIN + N_TEST,))
    return model, (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def run_job(out_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Fits every solver and scores; returns {name: tensor}."""
    import torchfluence as tfl

    model, (x, y), (xt, yt) = model_and_data()
    # A DataLoader with batches that do not line up with the blocks, to check global offsets.
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    # A random model is not at a minimum: the Gauss-Newton matrix keeps every solver well posed.
    gn = {"block_size": BLOCK, "second_order": "gauss_newton"}
    solvers = {
        "direct": tfl.DirectInfluence(model, F.cross_entropy, 1e-2, **gn),
        "cg": tfl.CgInfluence(model, F.cross_entropy, 1e-2, rtol=1e-10, maxiter=200, **gn),
        "lissa": tfl.LissaInfluence(model, F.cross_entropy, 1e-1, maxiter=40, scale=20.0, seed=3, **gn),
        "arnoldi": tfl.ArnoldiInfluence(model, F.cross_entropy, 1e-2, rank=20, **gn),
        "ekfac": tfl.EkfacInfluence(model, F.cross_entropy, 1e-2, block_size=BLOCK),
        "datainf": tfl.InverseHarmonicMeanInfluence(model, F.cross_entropy, 1e-2, block_size=BLOCK),
    }
    results = {}
    for name, im in solvers.items():
        im.fit(loader)
        results[f"{name}.influences"] = im.influences(xt, yt, x, y)
        top = im.top_k(xt, yt, loader, k=K)
        results[f"{name}.helpful"] = top.helpful_indices
        results[f"{name}.harmful"] = top.harmful_indices
        results[f"{name}.helpful_values"] = top.helpful_values
    direct = solvers["direct"]
    results["direct.self"] = direct.self_influences(x, y)
    results["direct.train"] = direct.train_influences(xt, yt)
    if out_dir is not None:
        results["direct.memmap"] = direct.influences(xt, yt, x, y, out=out_dir / "scores.npy").clone()
    return results


if __name__ == "__main__":
    import torch.distributed as dist
    from safetensors.torch import save_file

    from torchfluence.distributed import process_group_from_environment

    out = Path(sys.argv[1])
    with process_group_from_environment():
        results = run_job(out)
        save_file({k: v.contiguous() for k, v in results.items()}, str(out / f"rank{dist.get_rank()}.safetensors"))
