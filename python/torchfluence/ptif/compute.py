"""Shared machinery: the solver for a config, test-sample selection, and batched influence rows."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..influence import InfluenceFunctionModel
from ..solvers import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    KfacInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)
from ..topk import influence_scores
from .config import Settings

log = logging.getLogger("torchfluence.ptif")


def loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """The loss of pytorch-influence-functions: log-softmax + NLL, mean over the batch."""
    return F.cross_entropy(outputs, targets)


def check_model_device(model: nn.Module, device: torch.device) -> None:
    """The model must already live where config['gpu'] asks the work to run; it is never moved."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("model has no parameters")
    actual = param.device
    if actual.type != device.type or (device.type == "cuda" and actual.index != device.index):
        gpu = -1 if device.type == "cpu" else device.index
        raise ValueError(f"config['gpu'] is {gpu}, so the model must be on {device}, but it is on {actual}; "
                         f"call model.to({str(device)!r}) or change config['gpu']")


def make_solver(model: nn.Module, settings: Settings) -> InfluenceFunctionModel:
    """The solver `settings.solver` for the training loss, with lambda = damp (not fitted)."""
    model.eval()  # as the original: gradients of the deterministic network
    dtype = settings.dtype or model_dtype(model)
    common: dict[str, Any] = dict(dtype=dtype, block_size=settings.batch_size, progress=True)
    reg = settings.damp
    if settings.solver == "lissa":
        return LissaInfluence(model, loss, reg, maxiter=settings.recursion_depth, scale=settings.scale,
                              repetitions=settings.repetitions, seed=settings.seed, **common)
    if settings.solver == "cg":
        return CgInfluence(model, loss, reg, **common)
    if settings.solver == "direct":
        return DirectInfluence(model, loss, reg, **common)
    if settings.solver == "arnoldi":
        return ArnoldiInfluence(model, loss, reg, settings.rank, seed=settings.seed, **common)
    if settings.solver == "nystroem":
        return NystroemSketchInfluence(model, loss, reg, settings.rank, seed=settings.seed, **common)
    cls = EkfacInfluence if settings.solver == "ekfac" else KfacInfluence
    return cls(model, loss, reg, seed=settings.seed, **common)


def model_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, otherwise float32 (half-precision models are scored in float32)."""
    param = next(model.parameters())
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def in_order(loader: DataLoader, batch_size: int) -> DataLoader:
    """The loader's dataset in index order (a shuffling loader would scramble the training indices)."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"train_loader and test_loader must be torch DataLoaders, got {type(loader).__name__}")
    return DataLoader(loader.dataset, batch_size=batch_size, shuffle=False, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers)


def dataset_size(loader: DataLoader, name: str) -> int:
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"{name}.dataset must have a length (a map-style dataset)") from err
    if n == 0:
        raise ValueError(f"{name}.dataset is empty")
    return n


def labels(dataset: Any) -> list[Any]:
    """Every sample's label, reading a label column directly where the dataset has one."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return dataset.tensors[1].tolist()
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return targets.tolist() if hasattr(targets, "tolist") else list(targets)
    return [dataset[i][1] for i in range(len(dataset))]


def label_value(label: Any) -> Any:
    if isinstance(label, (Tensor, np.ndarray, np.generic)):
        return label.tolist() if getattr(label, "ndim", 0) else label.item()
    return label


def select_test_indices(test_loader: DataLoader, settings: Settings) -> list[int]:
    """The test samples to process, in order.

    With ``test_sample_num`` set: for each class 0..num_classes-1 in turn, its samples
    number ``test_start_index`` + 1 to ``test_start_index + test_sample_num`` (in dataset
    order). Without it: every test sample from index ``test_start_index`` on.
    """
    n_test = dataset_size(test_loader, "test_loader")
    if settings.test_sample_num is None:
        if settings.test_start_index >= n_test:
            raise ValueError(f"config['test_start_index'] is {settings.test_start_index}, but the test set "
                             f"has {n_test} samples")
        return list(range(settings.test_start_index, n_test))
    values = [label_value(t) for t in labels(test_loader.dataset)]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError("config['test_sample_num'] picks samples per class, which needs integer class labels; "
                         "set test_sample_num to False to process every test sample")
    num_classes = settings.num_classes or max(values) + 1
    by_class: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for index, value in enumerate(values):
        if value in by_class:
            by_class[value].append(index)
    chosen: list[int] = []
    start, stop = settings.test_start_index, settings.test_start_index + settings.test_sample_num
    for c, indices in by_class.items():
        if len(indices) < stop:
            log.warning(f"class {c} has {len(indices)} test samples; wanted numbers {start + 1}..{stop}")
        chosen.extend(indices[start:stop])
    if not chosen:
        raise ValueError(f"no test samples selected: test_start_index={start}, test_sample_num="
                         f"{settings.test_sample_num}, num_classes={num_classes}")
    return chosen


def collate(loader: DataLoader, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The samples `indices` of the loader's dataset as one batch (x, y)."""
    batch = loader.collate_fn([loader.dataset[i] for i in indices])
    return batch[0], batch[1]


def model_fingerprint(solver: InfluenceFunctionModel) -> str:
    """A hash of the parameters, so saved gradients are never reused for another model."""
    theta = solver.functions.theta.detach().to("cpu", torch.float64).contiguous()
    return hashlib.sha256(theta.numpy().tobytes()).hexdigest()[:16]


def influence_rows(score_blocks, n_train: int) -> Tensor:
    """``-(1/n) grad L(z_test)^T (H + damp I)^-1 grad L(z_j)`` for every training sample.

    Args:
        score_blocks: yields ``factors @ grads.T`` blocks (k, b) of the training data in index
            order, with factors (k, p) = ``(H + damp I)^-1 grad L(z_test)``.
        n_train: the training set's size n.

    Returns:
        (k, n_train) float64, Koh & Liang's I_up,loss divided by n.
    """
    rows, filled = None, 0
    for block in score_blocks:
        if rows is None:
            rows = torch.empty(block.shape[0], n_train, dtype=torch.float64)
        rows[:, filled:filled + block.shape[1]] = block.double().cpu()
        filled += block.shape[1]
    if filled != n_train:
        raise ValueError(f"the training gradients cover {filled} samples, but the training set has {n_train}")
    return rows.mul_(-1.0 / n_train)


def scored_batches(solver: InfluenceFunctionModel, factors: Tensor, ordered: DataLoader):
    """Yields (k, b) score blocks of the ordered training data (fused kernels where the layers allow)."""
    for x, y in tqdm(ordered, desc="training gradients", total=len(ordered)):
        yield solver.influences_from_factors(factors, x, y)


def scored_gradients(solver: InfluenceFunctionModel, factors: Tensor, gradient_blocks):
    """Yields (k, b) score blocks of saved gradient blocks (b, p), by the assembly kernel."""
    for grads in gradient_blocks:
        yield influence_scores(factors, grads)


def ranking(influence: Tensor) -> tuple[list[int], list[int]]:
    """(harmful, helpful) training indices for one row of influences (n_train,).

    Harmful first: the largest value, whose up-weighting raises the test loss the most.
    """
    order = torch.argsort(influence, descending=True, stable=True).tolist()
    return order, order[::-1]
