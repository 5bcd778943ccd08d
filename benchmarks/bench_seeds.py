"""The pyDVL ResNet18 notebook's workflow, with pyDVL 0.10 and with torchfluence after an import change.

The notebook fine-tunes a torchvision ResNet18 (torchvision's own when it imports, else
``examples/_resnet18.py``'s copy of its layout) whose backbone is frozen (``requires_grad=False``)
and whose ``fc`` is replaced by a 2-class head, then runs

    CgInfluence(model, loss, hessian_reg, progress=True).fit(train_loader)
    influences(test_x, test_y, train_x, train_y, mode="up")

Here the same code runs twice per round, once with ``pydvl.influence.torch.CgInfluence``
(its best documented configuration: ``solve_simultaneously=True``, block CG) and once
with ``torchfluence.pydvl.CgInfluence``: the import change alone, the same arguments
(the notebook's plus ``solve_simultaneously=True``, pyDVL's defaults otherwise: rtol
1e-4, atol 1e-6). torchfluence finds the frozen backbone and runs it once per sample
(automatic head mode). Two variants of the trainable
part: ``fc`` (the notebook) and ``layer4 + fc`` (a last block fine-tuned too).

Data: synthetic 3 x 64 x 64 images of two classes (a class-dependent smooth pattern plus
noise), 400 train x 100 test as in the notebook's subset; the trainable part is trained
for 30 Adam steps first. Fidelity: for ``fc`` against float64 DirectInfluence on the
head (exact); for ``layer4 + fc`` (8.4M parameters, no exact reference) the Pearson
correlation between the two libraries.

    .bench-venv/bin/python benchmarks/bench_seeds.py [--repeats 3] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from _resnet18 import resnet18  # noqa: E402
from bench_peers import PYDVL, interleaved, pearson, quiet, relative_error  # noqa: E402

import torchfluence as tfl  # noqa: E402
import torchfluence.pydvl as tfl_pydvl  # noqa: E402

REG = 1e-3


def seeds_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.interpolate(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)),
                                               size=(64, 64), mode="bilinear", align_corners=False)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.7 * patterns[y] + torch.randn(n, 3, 64, 64, generator=g)
    return x, y


def seeds_model(trainable: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The notebook's model: ResNet18 (random weights: no download), frozen, new 2-class fc."""
    torch.manual_seed(0)
    model = resnet18()
    for p in model.parameters():
        p.requires_grad = False
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.fc = nn.Linear(model.fc.in_features, 2)
    if trainable == "layer4+fc":
        model.layer4.requires_grad_(True)
    model.eval()  # BatchNorm statistics stay as they are; only the trainable weights move
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        batch = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    return model


def notebook(module, model: nn.Module, x, y, xt, yt, **extra) -> dict[str, float]:
    """The notebook's two calls, timed; `module` is pydvl.influence.torch or torchfluence."""
    began = time.perf_counter()
    im = module.CgInfluence(model, nn.CrossEntropyLoss(), REG, progress=False, **extra)
    im = im.fit(DataLoader(TensorDataset(x, y), batch_size=768))
    fitted = time.perf_counter()
    scores = im.influences(xt, yt, x, y, mode="up")
    done = time.perf_counter()
    notebook.last = scores
    return {"fit": fitted - began, "influences": done - fitted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--variants", nargs="*", default=["fc", "layer4+fc"])
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if PYDVL is None:
        sys.exit("pyDVL is not installed: run `make bench-peers` to create .bench-venv")
    torch.set_num_threads(torch.get_num_threads())
    x, y = seeds_data(args.n_train, 1)
    xt, yt = seeds_data(args.n_test, 2)
    rows = ["| trainable | params | pyDVL fit + influences s | torchfluence s | pyDVL / torchfluence | "
            "pyDVL err | torchfluence err | Pearson between them | rounds |", "|---|---|---|---|---|---|---|---|---|"]
    for variant in args.variants:
        model = seeds_model(variant, x, y)
        p = sum(q.numel() for q in model.parameters() if q.requires_grad)
        with quiet():
            notebook(PYDVL, model, x, y, xt, yt, solve_simultaneously=True)
            peer_scores = notebook.last
            notebook(tfl_pydvl, model, x, y, xt, yt, solve_simultaneously=True)
            ours_scores = notebook.last
        errors = ("-", "-")
        if variant == "fc":
            exact = tfl.DirectInfluence(model, F.cross_entropy, REG, dtype=torch.float64).fit((x, y)) \
                .influences(xt, yt, x, y)
            errors = (f"{relative_error(peer_scores, exact):.1e}", f"{relative_error(ours_scores, exact):.1e}")
        r = pearson(peer_scores, ours_scores)
        with quiet():
            medians = interleaved({
                "peer": lambda: notebook(PYDVL, model, x, y, xt, yt, solve_simultaneously=True),
                "ours": lambda: notebook(tfl_pydvl, model, x, y, xt, yt, solve_simultaneously=True),
            }, args.repeats)
        peer, ours = (sum(medians[k].values()) for k in ("peer", "ours"))
        rows.append(f"| {variant} | {p:,} | {peer:.2f} | {ours:.2f} | {peer / ours:.1f}x | {errors[0]} | "
                    f"{errors[1]} | {r:.4f} | {args.repeats} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
