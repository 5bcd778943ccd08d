"""The main job: find flipped labels in scikit-learn's digits with influence functions.

Trains a small CNN on digits with 10% of the training labels flipped, then
ranks the training points three ways (self-influence, average influence on the
test set, training loss) and reports how many flipped labels each ranking puts
in its top 5% / 10% / 20%, against random. Saves the most helpful and harmful
training images for a few test images as PNG, and the plots of
:mod:`torchfluence.plots`: influence histograms by training label, the top
training images of one test point, and self-influence against training loss.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .distributed import broadcast_module, is_main_process, process_group_from_environment, world
from .solvers import DirectInfluence

FRACTIONS = (0.05, 0.10, 0.20)


def load_digits_split(seed: int, flip_fraction: float = 0.1):
    """Digits as (1, 8, 8) images in [0, 1]; 80/20 split; `flip_fraction` of train labels changed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    n_train = int(0.8 * len(y))
    x_train, y_train = x[order[:n_train]], y[order[:n_train]].clone()
    x_test, y_test = x[order[n_train:]], y[order[n_train:]]
    flipped = torch.randperm(n_train, generator=gen)[: int(flip_fraction * n_train)]
    # A different class for each flipped point: add 1..9 modulo 10.
    y_train[flipped] = (y_train[flipped] + torch.randint(1, 10, (len(flipped),), generator=gen)) % 10
    is_flipped = torch.zeros(n_train, dtype=torch.bool)
    is_flipped[flipped] = True
    return x_train, y_train, x_test, y_test, is_flipped


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in tqdm(range(epochs), desc="training", disable=not is_main_process()):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def recall_at(scores: torch.Tensor, is_flipped: torch.Tensor) -> list[int]:
    """Flipped labels among the highest-scoring 5/10/20% of the training points."""
    order = torch.argsort(scores, descending=True)
    return [int(is_flipped[order[: int(f * len(order))]].sum()) for f in FRACTIONS]


def save_examples(path: Path, x_test, y_test, x_train, y_train, is_flipped, top, rows: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = top.helpful_indices.shape[1]
    fig, axes = plt.subplots(rows, 1 + 2 * k, figsize=(1.3 * (1 + 2 * k), 1.6 * rows))
    for r in range(rows):
        panels = [("test", x_test[r], f"label {int(y_test[r])}")]
        for kind, idx in (("helpful", top.helpful_indices[r]), ("harmful", top.harmful_indices[r])):
            for j in idx.tolist():
                mark = " (flipped)" if bool(is_flipped[j]) else ""
                panels.append((kind, x_train[j], f"{int(y_train[j])}{mark}"))
        for ax, (kind, img, text) in zip(axes[r], panels):
            ax.imshow(img[0], cmap="gray_r")
            ax.set_title(f"{kind}\n{text}", fontsize=7, color="red" if "flipped" in text else "black")
            ax.axis("off")
    fig.suptitle("Most helpful and harmful training images per test image (DirectInfluence, GGN)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_plots(out: Path, x_test, y_test, x_train, y_train, is_flipped, influences, self_influence,
               train_loss) -> dict:
    """The torchfluence.plots views of the demo's results; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plots

    names = ("influence_by_label", "top_images", "self_influence_vs_loss")
    paths = {name: out / f"{name}.png" for name in names}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    plots.plot_influence_distribution_by_label(influences[0], y_train,
                                               f"on test point 0 (label {int(y_test[0])})", ax=left)
    plots.plot_average_influence_by_label(influences, y_train, ax=right)
    fig.tight_layout()
    fig.savefig(paths["influence_by_label"], dpi=110)
    plt.close(fig)

    fig = plots.plot_top_training_images(x_train, influences[0], y_train, k=5, test_image=x_test[0],
                                         test_label=y_test[0], flipped=is_flipped, cmap="gray_r")
    fig.savefig(paths["top_images"], dpi=110)
    plt.close(fig)

    ax = plots.plot_self_influence_vs_loss(self_influence, train_loss, is_flipped)
    ax.figure.savefig(paths["self_influence_vs_loss"], dpi=110)
    plt.close(ax.figure)
    return {name: str(path) for name, path in paths.items()}


def run_demo(out_dir: str = "demo_out", seed: int = 0, epochs: int = 40, regularization: float = 1e-2) -> dict:
    """Runs the flipped-label demo; prints a table and writes report.json, examples.png and the
    plots of :func:`save_plots` (influence_by_label.png, top_images.png, self_influence_vs_loss.png)
    to `out_dir`."""
    start = time.perf_counter()
    main_process = is_main_process()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test, is_flipped = load_digits_split(seed)
    model = broadcast_module(train(small_cnn(), x_train, y_train, epochs, seed))
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        train_loss = F.cross_entropy(model(x_train), y_train, reduction="none")

    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=256)
    im = DirectInfluence(model, F.cross_entropy, regularization, second_order="gauss_newton",
                         progress=main_process)
    im.fit(train_loader)
    self_influence = im.self_influences(x_train, y_train)
    influences = im.influences(x_test, y_test, x_train, y_train)  # (n_test, n_train), positive = helpful
    harmfulness = -influences.mean(dim=0)
    top = im.top_k(x_test[:3], y_test[:3], train_loader, k=4)

    gen = torch.Generator().manual_seed(seed + 1)
    rankings = {
        "self-influence": self_influence,
        "average harmfulness on test set": harmfulness,
        "training loss": train_loss,
        "random": torch.rand(len(y_train), generator=gen),
    }
    n_flipped = int(is_flipped.sum())
    found = {name: recall_at(score, is_flipped) for name, score in rankings.items()}
    world_size = world()[1]
    if not main_process:  # every process holds the same results; one writes them
        return {"n_train": len(y_train), "n_flipped": n_flipped, "flipped_found": found}
    save_examples(out / "examples.png", x_test, y_test, x_train, y_train, is_flipped, top)
    figures = save_plots(out, x_test, y_test, x_train, y_train, is_flipped, influences, self_influence,
                         train_loss)

    print(f"\ndigits: {len(y_train)} train ({n_flipped} flipped labels), {len(y_test)} test; "
          f"CNN with {im.num_params} parameters, test accuracy {accuracy:.3f}; {world_size} process(es)")
    header = "| ranking | " + " | ".join(f"flipped in top {int(f * 100)}%" for f in FRACTIONS) + " |"
    print(header)
    print("|" + "---|" * (1 + len(FRACTIONS)))
    for name, counts in found.items():
        cells = " | ".join(f"{c}/{n_flipped} ({c / n_flipped:.0%})" for c in counts)
        print(f"| {name} | {cells} |")
    elapsed = time.perf_counter() - start
    print(f"\nexamples: {out / 'examples.png'}; report: {out / 'report.json'}; total {elapsed:.1f} s")
    print("plots: " + ", ".join(figures.values()))
    report = {"n_train": len(y_train), "n_flipped": n_flipped, "test_accuracy": accuracy, "processes": world_size,
              "fractions": FRACTIONS, "flipped_found": found, "seconds": elapsed, "figures": figures}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    """``python -m torchfluence.demo``; under ``torchrun --nproc_per_node N`` the processes share the job."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m torchfluence.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="folder for the report and PNG figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of the CNN")
    args = parser.parse_args()
    with process_group_from_environment():
        run_demo(out_dir=args.out, seed=args.seed, epochs=args.epochs)


if __name__ == "__main__":
    main()
