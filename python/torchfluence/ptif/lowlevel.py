"""The lower-level functions of pytorch-influence-functions, with the same signatures.

Parameter lists are ordered like ``model.parameters()`` restricted to those with
``requires_grad``. Nothing returned carries an autograd graph.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..influence import InfluenceFunctionModel
from .compute import (
    check_model_device,
    collate,
    dataset_size,
    in_order,
    influence_rows,
    loss,
    make_solver,
    ranking,
)
from .config import Settings, read_config
from .files import save_tensor

log = logging.getLogger("torchfluence.ptif")

PathLike = Union[str, Path, bool, None]
_BLOCK = 256  # samples per gradient block in the functions that take no batch size


def grad_z(z: Tensor, t: Tensor, model: nn.Module, gpu: int = -1) -> list[Tensor]:
    """Gradient of the mean loss over the batch (z, t), one tensor per trainable parameter."""
    check_model_device(model, _settings(gpu).device)
    model.eval()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    value = loss(model(z.to(device)), t.to(device))
    return [g.detach() for g in torch.autograd.grad(value, params)]


def s_test(z_test: Tensor, t_test: Tensor, model: nn.Module, z_loader: DataLoader, gpu: int = -1,
           damp: float = 0.01, scale: float = 25.0, recursion_depth: int = 5000) -> list[Tensor]:
    """LiSSA estimate of (H + damp I)^-1 grad L(z_test): the detached recursion over `z_loader`'s batches.

    ``h <- v + h - (H_batch + damp I) h / scale`` for `recursion_depth` steps, returned as h / scale.
    """
    return calc_s_test_single(model, z_test, t_test, z_loader, gpu, damp, scale, recursion_depth, r=1)


def calc_s_test_single(model: nn.Module, z_test: Tensor, t_test: Tensor, train_loader: DataLoader,
                       gpu: int = -1, damp: float = 0.01, scale: float = 25, recursion_depth: int = 5000,
                       r: int = 1) -> list[Tensor]:
    """:func:`s_test` averaged over `r` independent recursions (for the batch's mean loss)."""
    settings = _settings(gpu, damp, scale, recursion_depth, r)
    solver = _fitted(model, settings, train_loader)
    v = solver.grads(z_test, t_test).mean(dim=0, keepdim=True)  # the batch's mean-loss gradient
    return _unflatten(solver, solver.solve(v)[0])


def calc_s_test(model: nn.Module, test_loader: DataLoader, train_loader: DataLoader, save: PathLike = False,
                gpu: int = -1, damp: float = 0.01, scale: float = 25, recursion_depth: int = 5000, r: int = 1,
                start: int = 0) -> tuple[list[list[Tensor]], PathLike]:
    """s_test of every test sample from index `start` on, all solved together.

    With `save` (a folder), each is written to ``<i>_recdep<depth>_r<r>.s_test`` and the
    returned list is empty, as in the original.
    """
    settings = _settings(gpu, damp, scale, recursion_depth, r)
    solver = _fitted(model, settings, train_loader)
    folder = Path(save) if save else None
    if folder is None:
        log.info("ATTENTION: not saving s_test files.")
    s_tests = _per_sample(solver, test_loader, "test_loader", start, solver.influence_factors, folder,
                          f"_recdep{recursion_depth}_r{r}.s_test", "s_test")
    return s_tests, (folder if folder is not None else save)


def calc_grad_z(model: nn.Module, train_loader: DataLoader, save_pth: PathLike = False, gpu: int = -1,
                start: int = 0) -> tuple[list[list[Tensor]], PathLike]:
    """Per-sample gradients of every training sample from index `start` on, computed in batches.

    With `save_pth` (a folder), each is written to ``<i>.grad_z`` and the returned list is empty.
    """
    settings = _settings(gpu)
    check_model_device(model, settings.device)
    solver = make_solver(model, settings)  # only its gradients are used: no fit needed
    folder = Path(save_pth) if save_pth else None
    if folder is None:
        log.info("ATTENTION: Not saving grad_z files!")
    grad_zs = _per_sample(solver, train_loader, "train_loader", start, solver.grads, folder, ".grad_z", "grad_z")
    return grad_zs, (folder if folder is not None else save_pth)


def calc_influence_single(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, test_id_num: int,
                          gpu: int, recursion_depth: int, r: int, s_test_vec: Optional[list[Tensor]] = None,
                          time_logging: bool = False, *, damp: float = 0.01,
                          scale: float = 25) -> tuple[list[float], list[int], list[int], int]:
    """Influence of every training sample on test sample `test_id_num`.

    Returns:
        (influence, harmful, helpful, test_id_num): ``influence[j] = -(1/n) grad L(z_test)^T
        (H + damp I)^-1 grad L(z_j)``; harmful first lists the largest value (up-weighting
        raises the test loss the most), helpful is its reverse.
    """
    settings = _settings(gpu, damp, scale, recursion_depth, r)
    dataset_size(train_loader, "train_loader")  # refuses an empty or unsized dataset
    if s_test_vec is None:
        solver = _fitted(model, settings, train_loader)
        x, y = collate(test_loader, [test_id_num])
        factors = solver.influence_factors(x, y)
    else:
        check_model_device(model, settings.device)
        solver = make_solver(model, settings)
        factors = _flatten(solver, s_test_vec)[None]
    began = time.perf_counter()
    row = influence_rows(solver.scores_from_factors(factors, in_order(train_loader, _BLOCK)))[0]
    if time_logging:
        log.info(f"Time for all grad_z and the influence: {1000 * (time.perf_counter() - began):.1f} ms")
    harmful, helpful = ranking(row)
    return row.tolist(), harmful, helpful, test_id_num


def _per_sample(solver: InfluenceFunctionModel, loader: DataLoader, loader_name: str, start: int, compute,
                folder: Optional[Path], suffix: str, desc: str) -> list[list[Tensor]]:
    """``compute(x, y)`` -> (b, p) for the dataset from index `start` on, block by block; each row
    saved to ``<folder>/<i><suffix>`` as parameter-shaped tensors, or returned when there is no folder."""
    n = dataset_size(loader, loader_name)
    kept = []
    for begin in tqdm(range(start, n, _BLOCK), desc=desc):
        group = range(begin, min(begin + _BLOCK, n))
        for i, row in zip(group, compute(*collate(loader, group))):
            parts = _unflatten(solver, row)
            if folder is not None:
                save_tensor([p.cpu() for p in parts], folder / f"{i}{suffix}")
            else:
                kept.append(parts)
    return kept


def _settings(gpu: int, damp: float = 0.01, scale: float = 25, recursion_depth: int = 5000,
              r: int = 1) -> Settings:
    return read_config({"gpu": gpu, "damp": damp, "scale": scale, "recursion_depth": recursion_depth,
                        "r_averaging": r, "batch_size": _BLOCK})


def _fitted(model: nn.Module, settings: Settings, train_loader: DataLoader) -> InfluenceFunctionModel:
    check_model_device(model, settings.device)
    return make_solver(model, settings).fit(train_loader)


def _unflatten(solver: InfluenceFunctionModel, flat: Tensor) -> list[Tensor]:
    return [t.clone() for t in solver.functions.unflatten(flat).values()]


def _flatten(solver: InfluenceFunctionModel, parts: list[Tensor]) -> Tensor:
    shapes = [tuple(s) for s in solver.functions.shapes]
    got = [tuple(t.shape) for t in parts]
    if got != shapes:
        raise ValueError(f"s_test_vec must hold one tensor per trainable parameter with shapes {shapes}, got {got}")
    return torch.cat([t.reshape(-1) for t in parts]).to(solver.device, solver.dtype)
