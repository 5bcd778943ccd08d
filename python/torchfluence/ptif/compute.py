"""Shared machinery: the solver for a config, test-sample selection, and influence rows."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..influence import InfluenceFunctionModel
from ..solvers.by_name import make_solver as solver_by_name
from ..data import SampleBlock
from ..scoring import run_blocks
from ..sinks import DenseSink
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
    lissa = (dict(maxiter=settings.recursion_depth, scale=settings.scale, repetitions=settings.repetitions)
             if settings.solver == "lissa" else {})
    return solver_by_name(settings.solver, model, loss, settings.damp, rank=settings.rank, seed=settings.seed,
                          dtype=dtype, block_size=settings.batch_size, progress=True, **lissa)


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


def influence_rows(scores: Tensor) -> Tensor:
    """``-(1/n) grad L(z_test)^T (H + damp I)^-1 grad L(z_j)`` from the (k, n_train) scores.

    Args:
        scores: ``factors @ grads.T`` over the whole training set in index order, with
            factors (k, p) = ``(H + damp I)^-1 grad L(z_test)``.

    Returns:
        (k, n_train) float64 on the CPU, Koh & Liang's I_up,loss divided by n.
    """
    return scores.double().cpu().mul_(-1.0 / scores.shape[1])


def scores_of_saved_gradients(solver: InfluenceFunctionModel, factors: Tensor, gradient_files: Sequence,
                              load: Callable[[Any], Tensor]) -> Tensor:
    """(k, n_train) scores of saved (b, p) gradient blocks, by the assembly kernel, through the job runner."""
    blocks = SavedGradientBlocks(gradient_files, load)
    sink = DenseSink((factors.shape[0], blocks.count), dtype=solver.dtype, device=solver.device)
    run_blocks(blocks, lambda block: influence_scores(factors, block.x), [sink], "saved training gradients",
               solver.runtime)
    return sink.result()


class SavedGradientBlocks:
    """Saved gradient blocks as the job runner reads them: (b, p) rows with their global offsets.

    Args:
        files: the saved blocks in training-index order, each ``(path, first index, count)``.
        load: reads one block's (b, p) gradients.
    """

    def __init__(self, files: Sequence, load: Callable[[Any], Tensor]) -> None:
        self.files, self.load = list(files), load
        self.count = sum(int(count) for _, _, count in self.files)
        self.block_size = max((int(count) for _, _, count in self.files), default=1)

    def known_count(self) -> int:
        return self.count

    def blocks(self, *, select: Optional[Callable[[int], bool]] = None) -> Iterator[SampleBlock]:
        for index, entry in enumerate(self.files):
            if select is None or select(index):
                grads = self.load(entry)
                yield SampleBlock(grads, grads[:, :0], int(entry[1]))


def ranking(influence: Tensor) -> tuple[list[int], list[int]]:
    """(harmful, helpful) training indices for one row of influences (n_train,).

    Harmful first: the largest value, whose up-weighting raises the test loss the most.
    """
    order = torch.argsort(influence, descending=True, stable=True).tolist()
    return order, order[::-1]
