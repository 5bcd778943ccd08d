"""A ResNet-18 on an image folder, as users have them: EK-FAC, top-k training images per query.

The script writes a synthetic image folder itself (no download): one subfolder of PNG
files per class (written with PIL, or with zlib where PIL does not import), each class
a colour grating of its own orientation and frequency with random phase, brightness
and noise, plus a query folder laid out the same way. A copy of some query images is
also put in the training folder, so the ranking has an answer to look for: a training
image identical to a query, which helps that query the most unless the model fits it
already. Then it

1. reads both folders back with torchvision's ``ImageFolder`` where torchvision imports,
   otherwise with the small :class:`ImageFolderDataset` here (same order, same items);
2. builds a Hugging Face ``ResNetForImageClassification`` of ResNet-18's shape (basic
   blocks, depths 2-2-2-2, widths 64-128-256-512; random weights) and trains it for a
   few epochs, then puts it in eval mode (BatchNorm uses its running statistics);
3. fits EK-FAC on the training DataLoader, used unchanged (one warning line says which
   parameters it covers: the convolutions and the classifier, not BatchNorm);
4. ranks the training images for each query (``top_k``) and reports where each copy lands.

At the small size the model is still learning and each copy is its query's most helpful
image. A model trained to a low loss fits its queries and their copies well: their
gradients are small, and training images it still gets wrong (large gradients) can
outrank a copy. At the defaults (last epoch's loss 0.07) the four copies ranked 128th
to 2046th of 3004, and a few hundred images of one class led most queries' lists.

    python examples/resnet18_image_folder.py [--per-class 300] [--size 32] [--epochs 3]

The defaults (10 classes x 300 images at 32 x 32, the full-width ResNet-18: 11.2M
parameters) take 5 minutes on 2 CPU cores: training 110 s, EK-FAC fit 133 s, top-k 50 s;
``--per-class 24 --classes 4 --size 16 --width 8 --epochs 2`` runs in seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import struct
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch.utils.data import DataLoader, Dataset
from transformers import ResNetConfig, ResNetForImageClassification

MEAN, STD = 0.5, 0.25  # per-channel normalisation of pixel values in [0, 1]


# -- the image folder -------------------------------------------------------------------------------

def _png_writer():
    """save(path, uint8 array (H, W, 3)): PIL where it imports, else the standard library's zlib.

    (matplotlib's imsave is no fallback: matplotlib imports PIL itself.)
    """
    try:
        from PIL import Image
    except ImportError:
        return write_png
    return lambda path, pixels: Image.fromarray(pixels, mode="RGB").save(path)


def _png_reader():
    """read(path) -> uint8 array (H, W, 3): PIL where it imports, else :func:`read_png`."""
    try:
        from PIL import Image
    except ImportError:
        return read_png
    return lambda path: np.asarray(Image.open(path).convert("RGB"))


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """An 8-bit RGB PNG of (H, W, 3) uint8 pixels, rows unfiltered, with zlib alone."""
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, 3 * width)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                           + _chunk(b"IDAT", zlib.compress(rows.tobytes())) + _chunk(b"IEND", b""))


def read_png(path: str | os.PathLike) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of a PNG that :func:`write_png` wrote (8-bit RGB, rows unfiltered)."""
    data, pos, idat = Path(path).read_bytes(), 8, b""
    header = None
    while pos < len(data):
        length, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body, pos = data[pos + 8:pos + 8 + length], pos + 12 + length
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
    if header is None or header[2:4] != (8, 2) or header[6] != 0:
        raise ValueError(f"{path}: only 8-bit RGB PNGs without interlacing are read without PIL")
    width, height = header[0], header[1]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    if rows[:, 0].any():
        raise ValueError(f"{path}: rows with PNG filters are read with PIL only (pip install pillow)")
    return rows[:, 1:].reshape(height, width, 3)


def synthetic_image(label: int, n_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 (size, size, 3) image of class `label`: a grating of its class's angle, frequency, colour."""
    angle = math.pi * label / n_classes
    frequency = 2.0 + 1.5 * (label % 3)
    colour = np.array([0.5 + 0.5 * math.cos(2 * math.pi * (label / n_classes + c / 3)) for c in range(3)])
    u = np.linspace(-1.0, 1.0, size)
    xx, yy = np.meshgrid(u, u)
    phase = rng.uniform(0, 2 * math.pi)
    wave = 0.5 + 0.5 * np.sin(math.pi * frequency * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    image = wave[..., None] * colour * rng.uniform(0.6, 1.0) + rng.normal(0.0, 0.15, (size, size, 3))
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_image_folder(root: Path, n_classes: int, per_class: int, size: int, seed: int) -> None:
    """root/class_<c>/<i>.png for c < n_classes, i < per_class."""
    save, rng = _png_writer(), np.random.default_rng(seed)
    for c in range(n_classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            save(folder / f"{i:05d}.png", synthetic_image(c, n_classes, size, rng))


class ImageFolderDataset(Dataset):
    """root/<class>/<file>.png -> (normalised float (3, H, W), class index), in ImageFolder's order.

    Classes are the sorted subfolder names, files sorted within each; ``samples`` lists
    ``(path, class index)`` as torchvision's ``ImageFolder`` does.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        root = Path(root)
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [(str(path), c) for c, name in enumerate(self.classes)
                        for path in sorted((root / name).iterdir()) if path.suffix.lower() == ".png"]
        self.targets = [c for _, c in self.samples]
        self._read = _png_reader()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return to_tensor(self._read(path)), label


def to_tensor(pixels) -> torch.Tensor:
    """An (H, W, 3) 8-bit image (a PIL image or a uint8 array) -> normalised (3, H, W) float32."""
    array = np.asarray(pixels, dtype=np.uint8).astype(np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1) - MEAN) / STD


def image_folder(root: Path) -> Dataset:
    """torchvision's ImageFolder where torchvision imports, else ImageFolderDataset (same items and order)."""
    try:
        from torchvision.datasets import ImageFolder
    except Exception:  # absent, or built for another torch ("operator torchvision::nms does not exist")
        return ImageFolderDataset(root)
    return ImageFolder(str(root), transform=lambda image: to_tensor(image.convert("RGB")))


# -- the model --------------------------------------------------------------------------------------

def resnet18(num_labels: int, width: int = 64) -> ResNetForImageClassification:
    """ResNet-18's shape: basic blocks, depths [2, 2, 2, 2], widths width x [1, 2, 4, 8] (64: the real one)"""
    config = ResNetConfig(num_channels=3, embedding_size=width, depths=[2, 2, 2, 2], layer_type="basic",
                          hidden_sizes=[width, 2 * width, 4 * width, 8 * width], num_labels=num_labels)
    return ResNetForImageClassification(config)


def train(model: torch.nn.Module, loader: DataLoader, epochs: int, lr: float = 1e-3) -> float:
    """A few epochs of Adam in train mode, then eval mode; returns the last epoch's mean loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    mean = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            loss = F.cross_entropy(model(x).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(y), count + len(y)
        mean = total / count
    model.eval()  # BatchNorm from here on uses its running statistics
    return mean


# -- the whole run ----------------------------------------------------------------------------------

def run(per_class: int = 300, classes: int = 10, size: int = 32, width: int = 64, epochs: int = 3,
        queries_per_class: int = 2, duplicates: int = 4, k: int = 10, regularization: float = 1e-3,
        batch_size: int = 64, seed: int = 0, root: str | None = None) -> dict:
    """Writes the folders, trains, fits EK-FAC and ranks; returns what it printed, for the smoke test."""
    began = time.perf_counter()
    torch.manual_seed(seed)
    workdir = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="resnet18_image_folder_"))
    try:
        write_image_folder(workdir / "train", classes, per_class, size, seed)
        write_image_folder(workdir / "query", classes, queries_per_class, size, seed + 1)
        queries = image_folder(workdir / "query")
        # Copies of `duplicates` query images, spread over the classes, go into the training folder
        # under their class.
        duplicated = list(range(0, len(queries), max(1, len(queries) // max(duplicates, 1))))[:duplicates]
        for q in duplicated:
            path, label = queries.samples[q]
            shutil.copyfile(path, workdir / "train" / queries.classes[label] / f"copy_of_query_{q:03d}.png")
        train_set = image_folder(workdir / "train")
        train_paths = [Path(p).name for p, _ in train_set.samples]
        copy_index = {q: train_paths.index(f"copy_of_query_{q:03d}.png") for q in duplicated}

        model = resnet18(classes, width)
        stages = {"images": time.perf_counter() - began}
        final_loss = train(model, DataLoader(train_set, batch_size=batch_size, shuffle=True), epochs)
        stages["training"] = time.perf_counter() - began - sum(stages.values())
        train_loader = DataLoader(train_set, batch_size=batch_size)  # in index order, as top-k counts
        query_x, query_y = next(iter(DataLoader(queries, batch_size=len(queries))))
        with torch.no_grad():
            accuracy = float((model(query_x).logits.argmax(1) == query_y).float().mean())

        with warnings.catch_warnings(record=True) as caught:  # the one line saying what EK-FAC covers
            warnings.simplefilter("always")
            im = tfl.EkfacInfluence(model, F.cross_entropy, regularization).fit(train_loader)
        coverage = [str(w.message) for w in caught if "covers" in str(w.message)]
        stages["EK-FAC fit"] = time.perf_counter() - began - sum(stages.values())
        # The fitted loader, read once more: the top k of each query, and the (n_query, n_train) matrix
        # to say where each copy ranks (small here; leave with_scores out to stream without it).
        top = im.top_k(query_x, query_y, k=k, with_scores=True)
        stages["top-k"] = time.perf_counter() - began - sum(stages.values())
    finally:
        if root is None:
            shutil.rmtree(workdir, ignore_errors=True)

    train_labels = torch.tensor(train_set.targets)
    same_class = (train_labels[top.helpful_indices] == query_y[:, None]).float().mean(dim=1)  # (n_query,)
    # 1 = the most helpful training image for its query
    copy_rank = {q: 1 + int((top.scores[q] > top.scores[q, j]).sum()) for q, j in copy_index.items()}

    print(coverage[0] if coverage else "EkfacInfluence covers every parameter")
    print(f"{len(train_set)} training images ({classes} classes, {size}x{size}, "
          f"{len(duplicated)} copies of queries), "
          f"{len(queries)} queries; ResNet-18 of width {width}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; last epoch's loss {final_loss:.3f}, "
          f"query accuracy {accuracy:.2f}")
    for q in range(len(queries)):
        note = ""
        if q in copy_rank:
            note = f"; its copy (training image {copy_index[q]}) is number {copy_rank[q]} of {len(train_set)}"
        print(f"query {q} (class {int(query_y[q])}): most helpful {top.helpful_indices[q, :5].tolist()}, "
              f"{100 * float(same_class[q]):.0f}% of the top {k} of its class{note}")
    seconds = time.perf_counter() - began
    print(f"{seconds:.1f} s in all: " + ", ".join(f"{name} {t:.1f} s" for name, t in stages.items()))
    return {"top": top, "coverage": coverage, "copy_index": copy_index, "copy_rank": copy_rank,
            "same_class": same_class, "n_train": len(train_set), "n_query": len(queries),
            "accuracy": accuracy, "final_loss": final_loss, "train_labels": train_labels,
            "query_labels": query_y, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=300, help="training images per class")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage (64: ResNet-18)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--queries-per-class", type=int, default=2)
    parser.add_argument("--duplicates", type=int, default=4, help="queries copied to the training folder")
    parser.add_argument("--k", type=int, default=10, help="training images ranked per query")
    parser.add_argument("--regularization", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=None, help="folder for the images (default: a temporary one)")
    args = parser.parse_args(argv)
    run(args.per_class, args.classes, args.size, args.width, args.epochs, args.queries_per_class,
        args.duplicates, args.k, args.regularization, seed=args.seed, root=args.root)


if __name__ == "__main__":
    main()
