"""``torchfluence score``: influence scores for a user's own model and data, from the shell.

The command builds the model from a factory function, loads its weights (a
state dict, never arbitrary pickled objects), reads the training and test
data from image folders or tensor files, fits the chosen solver and writes

* ``influences.npy``: the (n_test, n_train) float32 matrix, written block by block;
* ``top_k.json``: the most helpful and most harmful training points per test point;
* ``summary.json``: solver, settings, sizes and timings;
* PNG plots (unless ``--no-plots``) and ``report.html``, which shows them
  next to a table of the top-k lists.

Bad input (a missing file, a wrong model spec, an empty folder, data that does
not fit) raises ValueError, TypeError or FileNotFoundError with a message that
names the command-line argument; :func:`torchfluence.cli.main` turns those into
an error line and exit code 2.
"""

from __future__ import annotations

import argparse
import html
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOLVERS = ("ekfac", "kfac", "cg", "lissa", "arnoldi", "direct", "nystroem")  # the keys of solvers.by_name.SOLVERS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TOP_IMAGE_PLOTS = 3  # test points that get a plot of their top training images
HTML_ROWS = 100  # test points listed in report.html (top_k.json has all)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``torchfluence score``."""
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="module:factory or path/to/file.py:factory; factory() returns the nn.Module")
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="state dict saved with torch.save (or a dict with a 'state_dict' or 'model' "
                             "entry), "
                             "or a .safetensors file")
    parser.add_argument("--train", required=True, metavar="DIR_OR_FILE",
                        help="training data: an image folder (one sub-folder per class), a .pt file with "
                             "{'x': Tensor, 'y': Tensor} or (x, y), or a .safetensors file with x and y")
    parser.add_argument("--test", required=True, metavar="DIR_OR_FILE", help="test data, as --train")
    parser.add_argument("--solver", choices=SOLVERS, default="ekfac",
                        help="inverse-curvature solver (default: ekfac)")
    parser.add_argument("--top-k", type=int, default=10, metavar="K",
                        help="helpful and harmful training points per test point (default: 10)")
    parser.add_argument("--out", default="results", metavar="DIR", help="output folder (default: results)")
    parser.add_argument("--regularization", type=float, default=1e-3,
                        help="lambda added to the curvature's diagonal (default: 1e-3)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="samples per block (default: 64); memory is about this times the parameters")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="resize folder images to N x N (default: keep; all must then have one size)")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of the arnoldi and nystroem solvers (default: 10, at most the parameters)")
    parser.add_argument("--second-order", choices=("gauss_newton", "hessian"), default="gauss_newton",
                        help="curvature of the cg, lissa, arnoldi, direct and nystroem solvers (default: "
                             "gauss_newton, positive semi-definite; ekfac and kfac always use it)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# ----------------------------------------------------------------------------- model

def _import_factory(spec: str) -> Callable[[], Any]:
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"--model must be module:factory or path/to/file.py:factory, got {spec!r}")
    module_part, name = spec.rsplit(":", 1)
    if not module_part or not name:
        raise ValueError(f"--model must be module:factory or path/to/file.py:factory, got {spec!r}")
    is_file = module_part.endswith(".py") or "/" in module_part or os.sep in module_part
    if is_file:
        path = Path(module_part)
        if not path.is_file():
            raise FileNotFoundError(f"--model: no such file: {module_part}")
        module_name = f"_torchfluence_model_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"--model: cannot load {module_part} as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)  # so the file can import its neighbours
        try:
            loader_spec.loader.exec_module(module)
        except (ImportError, SyntaxError) as exc:
            sys.modules.pop(module_name, None)
            raise ValueError(f"--model: importing {module_part} failed: {exc}") from exc
        finally:
            sys.path.remove(folder)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # a console script does not see the working directory otherwise
        try:
            module = importlib.import_module(module_part)
        except (ImportError, SyntaxError) as exc:
            raise ValueError(f"--model: cannot import module {module_part!r}: {exc}") from exc
    factory = getattr(module, name, None)
    if factory is None:
        raise ValueError(f"--model: {module_part} has no attribute {name!r}")
    if not callable(factory):
        raise TypeError(f"--model: {module_part}:{name} is not callable")
    return factory


def _read_state_dict(path_text: str) -> Mapping:
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"--weights: no such file: {path_text}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ValueError("--weights: reading .safetensors needs the safetensors package") from exc
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError for a corrupt file, ...
        raise ValueError(f"--weights: {path_text} is not a state dict that loads with weights_only=True "
                         f"(save model.state_dict(), not the model): {exc}") from exc
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state or \
            not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"--weights: {path_text} must hold a state dict (parameter names to tensors), "
                         f"got {type(state).__name__}")
    return state


def load_model(spec: str, weights: str, device: str) -> nn.Module:
    """``factory()`` from ``spec`` with the state dict of ``weights`` loaded, in eval mode on ``device``."""
    factory = _import_factory(spec)
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model: {spec}() must return a torch.nn.Module, got {type(model).__name__}")
    state = dict(_read_state_dict(weights))
    own = model.state_dict()
    wrapped = all(k.startswith("module.") for k in state)
    if state and wrapped and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel / DDP
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"--weights: {weights} does not match the model of --model {spec}: {exc}") from exc
    try:
        model = model.to(torch.device(device))
    except (RuntimeError, AssertionError) as exc:
        raise ValueError(f"--device: cannot use {device!r}: {exc}") from exc
    return model.eval()


# ----------------------------------------------------------------------------- data

@dataclass
class Dataset:
    """Inputs, class-index targets and, for image folders, the class names and file paths."""

    x: Tensor
    y: Tensor
    classes: Optional[list[str]] = None
    paths: Optional[list[str]] = None
    source: str = ""
    info: dict = field(default_factory=dict)


def _scan_folder(root: Path, arg: str,
                 class_names: Optional[list[str]]) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path, class index) pairs, in ImageFolder order (sorted classes, then sorted files)."""
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not found:
        raise ValueError(f"{arg}: {root} has no class sub-folders (expected {root}/<class>/<image>)")
    classes = class_names if class_names is not None else found
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise ValueError(f"{arg}: class folders {unknown} are not among the training classes {classes}")
    items = []
    for name in found:
        for folder, _dirs, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.join(folder, file), index[name]))
    if not items:
        raise ValueError(f"{arg}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    return classes, items


def _image_reader(image_size: Optional[int]) -> tuple[Callable[[str], Tensor], str]:
    """A function from a file path to a (3, H, W) float tensor in [0, 1], and the library used."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow comes with matplotlib
        raise ValueError("reading image folders needs Pillow (pip install pillow)") from exc
    try:
        from torchvision import transforms  # optional

        resize = [transforms.Resize((image_size, image_size))] if image_size else []
        convert = transforms.Compose([*resize, transforms.ToTensor()])
        library = "torchvision"
    except Exception:  # not installed, or an install that does not match torch
        def convert(img):
            if image_size:
                img = img.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
            return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        library = "PIL"

    def read(path: str) -> Tensor:
        with Image.open(path) as img:
            return convert(img.convert("RGB"))

    return read, library


def _load_folder(root: Path, arg: str, image_size: Optional[int],
                 class_names: Optional[list[str]]) -> Dataset:
    classes, items = _scan_folder(root, arg, class_names)
    read, library = _image_reader(image_size)
    images = []
    for path, _ in items:
        try:
            image = read(path)
        except OSError as exc:
            raise ValueError(f"{arg}: cannot read image {path}: {exc}") from exc
        if images and image.shape != images[0].shape:
            raise ValueError(f"{arg}: images have different sizes ({items[0][0]} is "
                             f"{tuple(images[0].shape[1:])}, {path} is {tuple(image.shape[1:])}); "
                             "pass --image-size N to resize them all to N x N")
        images.append(image)
    x = torch.stack(images)
    y = torch.tensor([label for _, label in items], dtype=torch.long)
    return Dataset(x, y, classes, [path for path, _ in items], str(root), {"images_read_with": library})


def _load_tensors(path: Path, arg: str) -> Dataset:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ValueError(f"{arg}: reading .safetensors needs the safetensors package") from exc
        data: Any = load_file(str(path))
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{arg}: {path} does not load with torch.load(weights_only=True): "
                             f"{exc}") from exc
    if isinstance(data, Mapping):
        missing = [key for key in ("x", "y") if key not in data]
        if missing:
            raise ValueError(f"{arg}: {path} must hold tensors 'x' and 'y', missing {missing} "
                             f"(found {sorted(map(str, data))[:10]})")
        x, y = data["x"], data["y"]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise ValueError(f"{arg}: {path} must hold {{'x': Tensor, 'y': Tensor}} or a pair (x, y), "
                         f"got {type(data).__name__}")
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{arg}: {name} in {path} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{arg}: {name} in {path} must have a sample dimension, got a 0-d tensor")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{arg}: x and y in {path} have different lengths ({x.shape[0]} and {y.shape[0]})")
    if x.shape[0] == 0:
        raise ValueError(f"{arg}: {path} holds no samples")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{arg}: y in {path} must be a 1-D tensor of integer class labels, got dtype "
                        f"{y.dtype} and shape {tuple(y.shape)}")
    return Dataset(x, y.long(), source=str(path))


def load_data(path_text: str, arg: str, image_size: Optional[int] = None,
              class_names: Optional[list[str]] = None) -> Dataset:
    """An image folder or a tensor file as a :class:`Dataset`; ``arg`` names the option in errors."""
    path = Path(path_text)
    if not path.exists():
        raise FileNotFoundError(f"{arg}: no such file or directory: {path_text}")
    if path.is_dir():
        return _load_folder(path, arg, image_size, class_names)
    return _load_tensors(path, arg)


# ----------------------------------------------------------------------------- solver

def _check_model_on(model: nn.Module, data: Dataset, arg: str, device: str) -> int:
    """Runs the model on one sample; returns its number of outputs (classes)."""
    try:
        with torch.no_grad():
            out = model(data.x[:1].to(device))
    except RuntimeError as exc:
        raise ValueError(f"--model: the model fails on the inputs of {arg} (one sample of shape "
                         f"{tuple(data.x.shape[1:])}): {exc}") from exc
    if not isinstance(out, Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"--model: the model must return (batch, classes) logits for cross-entropy, "
                         f"got {got}")
    classes = out.shape[1]
    high = int(data.y.max())
    if int(data.y.min()) < 0 or high >= classes:
        raise ValueError(f"{arg}: labels must be in [0, {classes}) for the model's {classes} outputs, "
                         f"got {high if high >= classes else int(data.y.min())}")
    return classes


# ----------------------------------------------------------------------------- outputs

def _top_k_json(top, train: Dataset, test: Dataset) -> dict:
    def entries(indices: Tensor, values: Tensor) -> list[dict]:
        rows = []
        for j, v in zip(indices.tolist(), values.tolist()):
            row = {"index": j, "score": float(v), "label": int(train.y[j])}
            if train.classes is not None:
                row["class"] = train.classes[int(train.y[j])]
            if train.paths is not None:
                row["path"] = train.paths[j]
            rows.append(row)
        return rows

    points = []
    for i in range(test.x.shape[0]):
        point: dict[str, Any] = {"index": i, "label": int(test.y[i])}
        if test.classes is not None:
            point["class"] = test.classes[int(test.y[i])]
        if test.paths is not None:
            point["path"] = test.paths[i]
        point["helpful"] = entries(top.helpful_indices[i].cpu(), top.helpful_values[i].cpu())
        point["harmful"] = entries(top.harmful_indices[i].cpu(), top.harmful_values[i].cpu())
        points.append(point)
    return {"k": int(top.helpful_indices.shape[1]),
            "sign": "positive scores are helpful (up-weighting the training point lowers the test loss)",
            "classes": train.classes, "test": points}


def _is_image_batch(x: Tensor) -> bool:
    return x.is_floating_point() and (x.dim() == 3 or (x.dim() == 4 and x.shape[1] in (1, 3)))


def _plots(out: Path, scores: np.ndarray, train: Dataset, test: Dataset, k: int) -> list[str]:
    """Writes the PNG plots; returns their file names."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global figure state needed

    from . import plots

    names = train.classes
    written = []

    def save(fig, name):
        fig.savefig(out / name, dpi=110)
        written.append(name)

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    plots.plot_average_influence_by_label(scores, train.y, label_names=names, ax=fig.add_subplot())
    save(fig, "average_influence_by_label.png")

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    label = names[int(test.y[0])] if names is not None else int(test.y[0])
    plots.plot_influence_distribution_by_label(np.asarray(scores[0]), train.y,
                                               f"on test point 0 (label {label})",
                                               label_names=names, ax=fig.add_subplot())
    save(fig, "influence_by_label_test0.png")

    if _is_image_batch(train.x) and _is_image_batch(test.x):
        shown = min(k, 5)
        for i in range(min(TOP_IMAGE_PLOTS, scores.shape[0])):
            fig = Figure(figsize=(1.7 * (shown + 1), 4.4), layout="constrained")
            plots.plot_top_training_images(train.x, np.asarray(scores[i]), train.y, k=shown,
                                           test_image=test.x[i], test_label=test.y[i],
                                           label_names=names, fig=fig)
            save(fig, f"top_images_test{i}.png")
    return written


def _report_html(out: Path, summary: dict, top: dict, pngs: list[str]) -> None:
    esc = html.escape

    def cell(rows: list[dict]) -> str:
        parts = []
        for r in rows:
            where = f" <span class='path'>{esc(r['path'])}</span>" if "path" in r else ""
            label = esc(str(r.get("class", r["label"])))
            parts.append(f"#{r['index']} ({label}) {r['score']:.4g}{where}")
        return "<br>".join(parts)

    rows = []
    for point in top["test"][:HTML_ROWS]:
        label = esc(str(point.get("class", point["label"])))
        where = f"<br><span class='path'>{esc(point['path'])}</span>" if "path" in point else ""
        rows.append(f"<tr><td>#{point['index']} ({label}){where}</td><td>{cell(point['helpful'])}</td>"
                    f"<td>{cell(point['harmful'])}</td></tr>")
    more = len(top["test"]) - HTML_ROWS
    note = f"<p>{more} more test points are in <code>top_k.json</code>.</p>" if more > 0 else ""
    figures = "\n".join(f"<figure><img src='{esc(name)}' alt='{esc(name)}'>"
                        f"<figcaption>{esc(name)}</figcaption></figure>" for name in pngs)
    settings = summary["settings"]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>torchfluence score</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; font-size: 0.9em; }}
.path {{ color: #666; font-size: 0.85em; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Influence scores</h1>
<p>Solver <b>{esc(summary['solver'])}</b>, regularization {settings['regularization']:g},
{summary['n_train']} training and {summary['n_test']} test points, {summary['num_params']} parameters.
Model <code>{esc(settings['model'])}</code>, weights <code>{esc(settings['weights'])}</code>.
Positive scores are helpful (up-weighting the training point lowers the test loss), negative ones harmful.
The full matrix is <code>influences.npy</code> (n_test, n_train).</p>
{figures}
<h2>Top {top['k']} per test point</h2>
<table><tr><th>test point</th><th>most helpful</th><th>most harmful</th></tr>
{chr(10).join(rows)}
</table>
{note}
</body></html>
"""
    (out / "report.html").write_text(page, encoding="utf-8")


# ----------------------------------------------------------------------------- the command

def run_score(args: argparse.Namespace) -> dict:
    """Runs ``torchfluence score`` for parsed arguments; returns the summary written to summary.json."""
    import torchfluence

    if args.top_k < 1:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if not args.regularization >= 0:
        raise ValueError(f"--regularization must be >= 0, got {args.regularization}")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be a positive integer, got {args.image_size}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {args.rank}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")

    timings: dict[str, float] = {}
    start = time.perf_counter()
    model = load_model(args.model, args.weights, args.device)
    timings["load_model"] = time.perf_counter() - start

    start = time.perf_counter()
    train = load_data(args.train, "--train", args.image_size)
    test = load_data(args.test, "--test", args.image_size, class_names=train.classes)
    if (train.classes is None) != (test.classes is None):
        raise ValueError("--train and --test must both be image folders or both be tensor files")
    if train.x.shape[1:] != test.x.shape[1:]:
        raise ValueError(f"--test: inputs of shape {tuple(test.x.shape[1:])} differ from those of --train "
                         f"{tuple(train.x.shape[1:])}" + (" (pass --image-size)" if train.paths else ""))
    timings["load_data"] = time.perf_counter() - start
    n_train, n_test = train.x.shape[0], test.x.shape[0]
    if args.top_k > n_train:
        raise ValueError(f"--top-k must be at most the number of training samples ({n_train}), "
                         f"got {args.top_k}")
    n_outputs = _check_model_on(model, train, "--train", args.device)
    _check_model_on(model, test, "--test", args.device)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .solvers.by_name import make_solver

    im = make_solver(args.solver, model, F.cross_entropy, args.regularization, rank=args.rank,
                     second_order=args.second_order, block_size=args.batch_size, progress=True)

    start = time.perf_counter()
    im.fit((train.x, train.y))
    timings["fit"] = time.perf_counter() - start

    start = time.perf_counter()
    matrix_path = out / "influences.npy"
    scores = im.influences(test.x, test.y, train.x, train.y, out=matrix_path)
    del scores
    if im.dtype != torch.float32:  # a float64 model: store float32 as documented
        full = np.load(matrix_path, mmap_mode="r")
        converted = np.asarray(full, dtype=np.float32)
        del full
        np.save(matrix_path, converted)
    timings["influences"] = time.perf_counter() - start

    start = time.perf_counter()
    top = im.top_k(test.x, test.y, k=args.top_k)
    top_json = _top_k_json(top, train, test)
    (out / "top_k.json").write_text(json.dumps(top_json, indent=1), encoding="utf-8")
    timings["top_k"] = time.perf_counter() - start

    pngs: list[str] = []
    plot_note = None
    if not args.no_plots:
        start = time.perf_counter()
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plot_note = "plots skipped: matplotlib is not installed"
            print(f"torchfluence score: {plot_note}", file=sys.stderr)
        else:
            pngs = _plots(out, np.load(matrix_path, mmap_mode="r"), train, test, args.top_k)
        timings["plots"] = time.perf_counter() - start

    summary = {
        "torchfluence_version": torchfluence.__version__,
        "torch_version": torch.__version__,
        "solver": args.solver,
        "solver_class": type(im).__name__,
        "settings": {"model": args.model, "weights": args.weights, "train": args.train, "test": args.test,
                     "regularization": args.regularization, "batch_size": args.batch_size,
                     "device": args.device, "image_size": args.image_size, "top_k": args.top_k,
                     "rank": im.options().to_dict().get("rank"),
                     "second_order": ("gauss_newton" if "second_order" in im.traits.fixed_options
                                      else args.second_order),
                     "plots": not args.no_plots},
        "solver_options": im.options().to_dict(),
        "n_train": n_train,
        "n_test": n_test,
        "num_params": im.num_params,
        "num_outputs": n_outputs,
        "input_shape": list(train.x.shape[1:]),
        "classes": train.classes,
        "dtype": str(im.dtype).replace("torch.", ""),
        "timings_s": {key: round(value, 4) for key, value in timings.items()},
        "files": ["influences.npy", "top_k.json", "summary.json", "report.html", *pngs],
        **train.info,
    }
    if plot_note:
        summary["note"] = plot_note
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    _report_html(out, summary, top_json, pngs)

    print(f"torchfluence score: {args.solver}, {n_test} test x {n_train} training points "
          f"in {sum(timings.values()):.1f} s")
    print(f"results in {out}/: influences.npy ({n_test}, {n_train}), top_k.json, summary.json, report.html"
          + (f", {len(pngs)} PNG plots" if pngs else ""))
    return summary
