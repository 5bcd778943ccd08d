"""Head mode against the generic path on a ResNet18-shaped model with a frozen backbone.

A ResNet18 (ImageNet layout: 7x7 stride-2 stem and max-pool, BasicBlocks
[2, 2, 2, 2], 64..512 channels; random init, eval mode) on synthetic 3 x 64 x 64 images with 10 classes. Only the final Linear
layer is trainable, as when fine-tuning the last layer. The same CG solve
(fixed iteration count) and the full test x train influence matrix run
generically (every curvature product re-runs the backbone) and in head mode
(the backbone runs once per image; the head's curvature products are closed
form). The results are checked to agree before the times are reported. A
second table times the closed-form ``linear_head_hvp`` against the torch.func
HVP of the head on the same features.

    python benchmarks/bench_head.py [--quick] [--device cuda] [--markdown FILE]
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
import torchfluence as tfl  # noqa: E402
from _timing import environment, median_seconds, print_table  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))  # the ImageNet stem: 64 x 64 -> 16 x 16
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and iterations")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    n_train, n_test, iterations = (128, 8, 5) if args.quick else (512, 16, 30)
    reg = 1e-3

    torch.manual_seed(0)
    model = ResNet18().to(device).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    x, y = torch.randn(n_train, 3, 64, 64, device=device), torch.randint(0, 10, (n_train,), device=device)
    xt, yt = torch.randn(n_test, 3, 64, 64, device=device), torch.randint(0, 10, (n_test,), device=device)
    train = DataLoader(TensorDataset(x, y), batch_size=128)
    options = dict(rtol=1e-12, maxiter=iterations, block_size=128)  # the same fixed number of CG steps

    def timed(fn):  # wall time, synchronised on CUDA
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began, out

    generic_s, generic = timed(lambda: tfl.CgInfluence(model, F.cross_entropy, reg, **options).fit(train)
                               .influences(xt, yt, x, y))
    head_s, head = timed(lambda: tfl.HeadInfluence(tfl.CgInfluence, model, F.cross_entropy, reg, batch_size=128,
                                                   rtol=1e-12, maxiter=iterations).fit(train)
                         .train_influences(xt, yt))
    err = float((head - generic).norm() / generic.norm())
    if err > 1e-3:
        raise AssertionError(f"head mode disagrees with the generic path: relative error {err:.1e}")
    rows = [[f"CG, {iterations} it., {n_test} x {n_train}", "generic (torch.func through the backbone)",
             f"{generic_s:.2f}", "1.0x", "-"],
            [f"CG, {iterations} it., {n_test} x {n_train}", "HeadInfluence (features once, closed-form HVP)",
             f"{head_s:.2f}", f"{generic_s / head_s:.1f}x", f"{err:.1e}"]]

    # The head's curvature products alone: closed form against torch.func on the same features.
    hm = tfl.HeadInfluence(tfl.CgInfluence, model, F.cross_entropy, reg)
    features = hm.features(x)
    plain = tfl.AutogradHessian(hm.functions)
    closed = hm.curvature_operator
    assert isinstance(closed, tfl.LinearHeadCurvature)
    hvp_rows = []
    for k in (16, 128):
        v = torch.randn(k, hm.num_params, device=device)
        expected = plain.batch_vp(v, features, y)
        got = closed.batch_vp(v, features, y)
        hvp_err = float((got - expected).norm() / expected.norm())
        t_plain = median_seconds(lambda: plain.batch_vp(v, features, y), device)
        t_closed = median_seconds(lambda: closed.batch_vp(v, features, y), device)
        hvp_rows.append([f"{n_train} x 512 -> 10, k={k}", f"{t_plain * 1e3:.2f}", f"{t_closed * 1e3:.2f}",
                         f"{t_plain / t_closed:.1f}x", f"{hvp_err:.1e}"])

    env = environment(device)
    print(env)
    first = print_table(["work", "path", "seconds", "speed-up", "rel. difference"], rows)
    second = print_table(["head HVP (n x d -> C, k vectors)", "torch.func ms", "linear_head_hvp ms", "speed-up",
                          "rel. error"], hvp_rows)
    if args.markdown:
        Path(args.markdown).write_text(f"{env}\n\n{first}\n\n{second}\n")


if __name__ == "__main__":
    main()
