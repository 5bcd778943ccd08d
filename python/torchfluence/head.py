"""Head mode: influence through a trainable head on top of a frozen backbone.

When only the last part of a model is trained (the usual fine-tuning setup),
every curvature product of the generic path re-runs the frozen backbone.
:class:`HeadInfluence` runs the model once over each dataset, keeps the
head's inputs (the features) in memory or on disk, and fits and scores the
head alone. With a linear head and cross-entropy, MSE or BCE-with-logits
loss, its curvature products are the closed forms of
:mod:`torchfluence.linear_head`. The results equal those of the generic path
on the full model, whose trainable parameters are the head's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ._data import Batches, check_pair, chunks, count_samples, iterate_batches
from .influence import InfluenceFunctionModel, Mode, TopKInfluences
from .linear_head import linear_head_hvp, loss_kind


class HeadInfluence:
    """Any solver, run on a model's trainable head over cached backbone features.

    Args:
        solver: the solver class, e.g. ``CgInfluence`` or ``EkfacInfluence``.
        model: the full model; the head is its trainable part.
        loss, regularization: as for the solver.
        head: the head module or its name in ``model.named_modules()``. Default:
            the smallest submodule holding every parameter with ``requires_grad``.
            Its output must be the model's output.
        cache_dir: keep the training features in a memory-mapped file there
            instead of in memory (for training sets larger than RAM).
        batch_size: samples per backbone pass and per head block.
        **solver_kwargs: passed to the solver (``dtype``, ``maxiter``, ...).

    The API is the solver's: ``fit``, ``influences``, ``influence_factors``,
    ``influences_from_factors``, ``self_influences``, ``top_k``; inputs are the
    model's inputs. Factors are (n_test, p_head). ``mode="perturbation"`` needs
    gradients through the backbone and is not available here.
    """

    def __init__(self, solver: type, model: nn.Module, loss, regularization: float = 0.0, *,
                 head: Optional[Union[str, nn.Module]] = None, cache_dir: Optional[Union[str, Path]] = None,
                 batch_size: int = 256, **solver_kwargs: Any) -> None:
        if not (isinstance(solver, type) and issubclass(solver, InfluenceFunctionModel)):
            raise TypeError(f"solver must be an InfluenceFunctionModel subclass, got {solver!r}")
        self.model = model
        self.head_name, self.head = find_head(model, head)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        cls = solver
        if isinstance(self.head, nn.Linear) and loss_kind(loss) is not None:
            cls = type(f"LinearHead{solver.__name__}", (LinearHeadCurvature, solver), {})
        self.solver: InfluenceFunctionModel = cls(self.head, loss, regularization,
                                                  block_size=batch_size, **solver_kwargs)
        self._train_features: Optional[Tensor] = None
        self._train_targets: Optional[Tensor] = None
        self._train_data: Optional[Batches] = None

    # -- features -----------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """The head's inputs for `x`, (n, d), one backbone pass per block of `batch_size`."""
        parts = [self._head_inputs(x[s:s + self.batch_size]) for s in range(0, x.shape[0], self.batch_size)]
        return torch.cat(parts) if parts else x.new_zeros(0)

    def _head_inputs(self, x: Tensor) -> Tensor:
        seen: list[Tensor] = []

        def hook(module, inputs, output):
            seen.append(inputs[0].detach())
            self._last_head_output = output

        handle = self.head.register_forward_hook(hook)
        try:
            with torch.no_grad():
                out = self.model(x.to(self.solver.device))
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(f"head {self.head_name!r} must be called exactly once per forward pass, "
                             f"it was called {len(seen)} times")
        if self._last_head_output is not out:
            raise ValueError(f"head {self.head_name!r}: its output is not the model's output, so the model "
                             "is not backbone -> head; pass head= the last module")
        return seen[0]

    def _cache(self, train_data: Batches) -> tuple[Tensor, Tensor]:
        """Training features (n, *feature_shape) and targets; with cache_dir, the features are written block by block
        into a memory-mapped file, so the training set never has to fit in memory."""
        n = count_samples(train_data, "train_data")
        features: Optional[Tensor] = None
        targets, filled = [], 0
        for x, y in tqdm(iterate_batches(train_data, "train_data"), desc="backbone features",
                         disable=not self.solver.progress):
            for _, xb, yb in chunks(x, y, self.batch_size):
                block = self._head_inputs(xb)
                if features is None:
                    shape = (n, *block.shape[1:])
                    features = (_memmap(shape, self.cache_dir / "train_features.npy") if self.cache_dir is not None
                                else block.new_empty(shape))
                features[filled:filled + block.shape[0]] = block.to(features.device, features.dtype)
                filled += block.shape[0]
                targets.append(yb)
        if filled != n:
            raise ValueError(f"train_data yielded {filled} samples, but {n} were counted")
        return features, torch.cat(targets)

    def _feature_loader(self, features: Tensor, targets: Tensor) -> DataLoader:
        return DataLoader(TensorDataset(features, targets), batch_size=self.batch_size)

    # -- the solver's API ---------------------------------------------------------------------------
    def fit(self, train_data: Batches) -> "HeadInfluence":
        """Caches the training features (one backbone pass) and fits the solver on the head."""
        self._train_features, self._train_targets = self._cache(train_data)
        self._train_data = train_data
        self.solver.fit(self._feature_loader(self._train_features, self._train_targets))
        return self

    def influence_factors(self, x_test: Tensor, y_test: Tensor) -> Tensor:
        """(n_test, p_head)."""
        return self.solver.influence_factors(self.features(x_test), y_test)

    def influences(self, x_test: Tensor, y_test: Tensor, x: Optional[Tensor] = None, y: Optional[Tensor] = None,
                   mode: Mode = "up") -> Tensor:
        """(n_test, n) influences of (x, y) (default: the test points) on the test points."""
        self._check_mode(mode)
        if (x is None) != (y is None):
            raise ValueError("x and y must be given together (or both left out to use the test points)")
        f_test = self.features(x_test)
        f = f_test if x is None else self.features(x)
        return self.solver.influences(f_test, y_test, f, y_test if y is None else y)

    def train_influences(self, x_test: Tensor, y_test: Tensor) -> Tensor:
        """(n_test, n_train) influences of every fitted training sample, from the cached features
        (no second backbone pass over the training data)."""
        if self._train_features is None:
            raise RuntimeError("HeadInfluence is not fitted: call .fit(train_loader) first")
        factors = self.influence_factors(x_test, y_test)
        out = torch.empty(factors.shape[0], self._train_features.shape[0], dtype=factors.dtype,
                          device=factors.device)
        for start in range(0, out.shape[1], self.batch_size):
            f = self._train_features[start:start + self.batch_size]
            y = self._train_targets[start:start + self.batch_size]
            out[:, start:start + f.shape[0]] = self.solver.influences_from_factors(factors, f, y)
        return out

    def influences_from_factors(self, factors: Tensor, x: Tensor, y: Tensor, mode: Mode = "up") -> Tensor:
        self._check_mode(mode)
        return self.solver.influences_from_factors(factors, self.features(x), y)

    def self_influences(self, x: Tensor, y: Tensor) -> Tensor:
        check_pair(x, y)
        return self.solver.self_influences(self.features(x), y)

    def top_k(self, x_test: Tensor, y_test: Tensor, train_data: Optional[Batches] = None,
              k: int = 10) -> TopKInfluences:
        """Top-k over `train_data` (default: the fitted training data, from the cached features)."""
        if train_data is None or train_data is self._train_data:
            if self._train_features is None:
                raise RuntimeError("HeadInfluence is not fitted: call .fit(train_loader) first")
            data = self._feature_loader(self._train_features, self._train_targets)
        else:
            data = ((self.features(x), y) for x, y in iterate_batches(train_data, "train_data"))
        return self.solver.top_k(self.features(x_test), y_test, data, k)

    @property
    def num_params(self) -> int:
        return self.solver.num_params

    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode != "up":
            raise ValueError(f"HeadInfluence supports mode='up' only (perturbation needs the backbone's "
                             f"input gradients: use the solver on the full model), got {mode!r}")


class LinearHeadCurvature:
    """Mixin for solvers on an ``nn.Linear`` head: exact curvature products in closed form."""

    def batch_curvature_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:  # noqa: ARG002 - y unused
        f = self.functions  # type: ignore[attr-defined]
        params = f.unflatten(f.theta)
        head: nn.Linear = f.model
        weight = params.get("weight", head.weight.detach().to(f.dtype))
        bias = params.get("bias") if head.bias is not None else None
        if "bias" not in params and head.bias is not None:
            bias = head.bias.detach().to(f.dtype)
        C, d = weight.shape
        k = vectors.shape[0]
        full = torch.zeros(k, C, d + (bias is not None), dtype=vectors.dtype, device=vectors.device)
        _scatter(vectors, full, f.names, C, d)
        hv = linear_head_hvp(f.cast_input(x), weight, bias, full, loss_kind(f.loss))
        return _gather(hv, f.names, C, d)


def _scatter(vectors: Tensor, full: Tensor, names: list[str], C: int, d: int) -> None:
    start = 0
    for name in names:
        if name == "weight":
            full[..., :d] = vectors[:, start:start + C * d].view(-1, C, d)
            start += C * d
        else:
            full[..., d] = vectors[:, start:start + C]
            start += C


def _gather(hv: Tensor, names: list[str], C: int, d: int) -> Tensor:
    parts = [hv[..., :d].reshape(hv.shape[0], C * d) if name == "weight" else hv[..., d] for name in names]
    return torch.cat(parts, dim=1)


def find_head(model: nn.Module, head: Optional[Union[str, nn.Module]]) -> tuple[str, nn.Module]:
    """(name, module) of the head: given, or the smallest submodule owning every trainable parameter."""
    modules = dict(model.named_modules())
    if isinstance(head, str):
        if head not in modules:
            raise ValueError(f"head: no submodule named {head!r}; the model has {list(modules)[1:]}")
        return head, modules[head]
    if isinstance(head, nn.Module):
        for name, module in modules.items():
            if module is head:
                return name, module
        raise ValueError("head: the given module is not a submodule of model")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("head: the model has no parameter with requires_grad, so there is no head to find")
    prefix = _common_prefix([name.rsplit(".", 1)[0] if "." in name else "" for name in trainable])
    if prefix == "":
        raise ValueError(f"head: the trainable parameters {trainable[:5]} do not sit in one submodule; "
                         "freeze the backbone (requires_grad=False) or pass head=")
    return prefix, modules[prefix]


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _memmap(shape: tuple[int, ...], path: Path) -> Tensor:
    """A float32 tensor backed by a .npy file: pages come from disk, only touched blocks sit in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape))
