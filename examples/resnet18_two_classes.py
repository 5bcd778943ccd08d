"""The pyDVL ResNet18 notebook, end to end, with only the import changed.

The notebook fine-tunes a frozen ResNet18's new 2-class ``fc`` on two image classes,
computes influences with ``CgInfluence``, looks at their distribution by label and at
the most and least influential training images, and hunts for corrupted training
labels. Here the images are embedded (scikit-learn's digits, two classes, upsampled to
3 x 64 x 64) and the ResNet18 has random weights (no download); 10% of the training
labels are flipped so that the hunt has known answers. The only line that differs from
the notebook is the import::

    from torchfluence.pydvl import CgInfluence      # was: from pydvl.influence.torch import CgInfluence

Writes PNG plots and ``detection.md`` (how many flipped labels each ranking puts in its
top 5 / 10 / 20 %) to ``--out``.

    python examples/resnet18_two_classes.py [--out resnet18_out] [--epochs 60]
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

from torchfluence import plots
from torchfluence.pydvl import CgInfluence

sys.path.insert(0, str(Path(__file__).parent))
from _resnet18 import resnet18  # noqa: E402

CLASSES = (3, 8)  # digits that look alike at low resolution: a realistic two-class task
LABEL_NAMES = {0: f"digit {CLASSES[0]}", 1: f"digit {CLASSES[1]}"}
FRACTIONS = (0.05, 0.10, 0.20)


def two_class_images(seed: int, flip_fraction: float = 0.1):
    """(x_train, y_train, x_test, y_test, is_flipped): 3 x 64 x 64 images normalised per channel."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = torch.isin(torch.tensor(digits.target), torch.tensor(CLASSES))
    images = torch.tensor(digits.images, dtype=torch.float32)[keep].unsqueeze(1) / 16.0
    labels = (torch.tensor(digits.target)[keep] == CLASSES[1]).long()
    x = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - x.mean()) / x.std()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    n_train = int(0.75 * len(labels))
    x_train, y_train = x[order[:n_train]].contiguous(), labels[order[:n_train]].clone()
    x_test, y_test = x[order[n_train:]].contiguous(), labels[order[n_train:]]
    flipped = torch.randperm(n_train, generator=gen)[: int(flip_fraction * n_train)]
    y_train[flipped] = 1 - y_train[flipped]
    is_flipped = torch.zeros(n_train, dtype=torch.bool)
    is_flipped[flipped] = True
    return x_train, y_train, x_test, y_test, is_flipped


def new_resnet_model(output_size: int) -> nn.Module:
    """The notebook's model: ResNet18 with every parameter frozen and a new trainable fc."""
    model = resnet18()
    for param in model.parameters():
        param.requires_grad = False
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.fc = nn.Linear(model.fc.in_features, output_size)
    return model


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """Trains the head. BatchNorm stays in eval mode: the frozen backbone does not change."""
    model.eval()
    with torch.no_grad():
        features = model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))).flatten(1)
    opt = torch.optim.Adam(model.fc.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model.fc(features), y).backward()
        opt.step()
    return model


def detection_table(rankings: dict[str, torch.Tensor], is_flipped: torch.Tensor) -> str:
    """How many flipped labels each ranking (most suspicious first) puts in its top 5/10/20 %."""
    n, total = len(is_flipped), int(is_flipped.sum())
    head = "| ranking | " + " | ".join(f"top {int(f * 100)}% ({int(f * n)} points)" for f in FRACTIONS) + " |"
    rows = [head, "|---|" + "---|" * len(FRACTIONS)]
    for name, order in rankings.items():
        found = [int(is_flipped[order[: int(f * n)]].sum()) for f in FRACTIONS]
        rows.append(f"| {name} | " + " | ".join(f"{k} of {total}" for k in found) + " |")
    return "\n".join(rows)


def run(out_dir: str = "resnet18_out", epochs: int = 60, seed: int = 0, hessian_reg: float = 1e-3) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    began = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y, is_flipped = two_class_images(seed)
    model = train(new_resnet_model(output_size=2), train_x, train_y, epochs)
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    train_data = DataLoader(TensorDataset(train_x, train_y), batch_size=768)

    # The notebook's influence cells, unchanged.
    influence_model = CgInfluence(model, nn.CrossEntropyLoss(), hessian_reg, progress=True)
    influence_model = influence_model.fit(train_data)
    influences = influence_model.influences(test_x, test_y, train_x, train_y, mode="up")

    self_influence = influence_model.influences(train_x, train_y, train_x, train_y, mode="up").diagonal()
    with torch.no_grad():
        losses = F.cross_entropy(model(train_x), train_y, reduction="none")
    mean_influence = influences.mean(dim=0)
    rankings = {
        "self-influence (largest first)": self_influence.argsort(descending=True, stable=True),
        "mean influence on the test set (most harmful first)": mean_influence.argsort(stable=True),
        "training loss (largest first), for comparison": losses.argsort(descending=True, stable=True),
    }
    table = detection_table(rankings, is_flipped)
    (out / "detection.md").write_text(table + "\n")

    figures = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    plots.plot_influence_distribution_by_label(influences[0], train_y, "test point 0",
                                               label_names=LABEL_NAMES, ax=axes[0])
    plots.plot_average_influence_by_label(influences, train_y, label_names=LABEL_NAMES, ax=axes[1])
    figures["influence_by_label"] = out / "influence_by_label.png"
    fig.savefig(figures["influence_by_label"], dpi=100)
    plt.close(fig)
    fig = plots.plot_top_training_images(train_x, influences[0], train_y, k=5, test_image=test_x[0],
                                         test_label=int(test_y[0]), flipped=is_flipped, label_names=LABEL_NAMES)
    figures["top_images"] = out / "top_images.png"
    fig.savefig(figures["top_images"], dpi=100)
    plt.close(fig)
    fig = plots.plot_top_images_per_class(train_x, mean_influence, train_y, k=3, label_names=LABEL_NAMES)
    figures["top_images_per_class"] = out / "top_images_per_class.png"
    fig.savefig(figures["top_images_per_class"], dpi=100)
    plt.close(fig)
    ax = plots.plot_self_influence_vs_loss(self_influence, losses, flipped=is_flipped)
    figures["self_influence_vs_loss"] = out / "self_influence_vs_loss.png"
    ax.figure.savefig(figures["self_influence_vs_loss"], dpi=100)
    plt.close(ax.figure)

    seconds = time.perf_counter() - began
    print(f"test accuracy {accuracy:.3f}; {len(train_y)} train ({int(is_flipped.sum())} flipped), "
          f"{len(test_y)} test; {seconds:.1f} s\n\n{table}\n\nwritten to {out}/")
    return {"accuracy": accuracy, "influences": influences, "self_influence": self_influence,
            "table": table, "figures": figures, "seconds": seconds, "is_flipped": is_flipped,
            "rankings": rankings}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="resnet18_out")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.out, args.epochs, args.seed)


if __name__ == "__main__":
    main()
