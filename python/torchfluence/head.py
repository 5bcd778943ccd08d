"""Head mode: influence through a trainable head on top of a frozen backbone.

When only the last part of a model is trained (the usual fine-tuning setup),
every curvature product of the generic path re-runs the frozen backbone.
In head mode the backbone runs once per sample: :class:`BackboneFeatures`
turns inputs into the head's inputs (the features), caches the training
set's features (in memory, or memory-mapped on disk), and the solver works
on the head alone, as if the head were the model. Any solver runs in head
mode (``head=`` argument); a linear head with cross-entropy, MSE or
BCE-with-logits loss gets its curvature in closed form
(:class:`torchfluence.curvature.LinearHeadCurvature`). The results equal those
of the generic path on the full model whose trainable parameters are the head's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .data import Samples
from .sinks import DenseSink, MemmapSink

HeadSpec = Union[str, nn.Module]


class BackboneFeatures:
    """The inputs of `head` inside `model`, computed without gradients.

    Args:
        model: the full model; ``head`` must produce its output.
        head: the head module, its name, or ``"auto"``: the smallest submodule
            holding every parameter with ``requires_grad``.
        dtype: the computation dtype; the backbone runs in it (a float32 model
            is cast for a float64 computation, as in the generic path).
        cache_dir: where the training features are memory-mapped (None: in memory).
    """

    def __init__(self, model: nn.Module, head: HeadSpec, dtype: torch.dtype,
                 cache_dir: Optional[Union[str, Path]] = None, progress: bool = False) -> None:
        self.model = model
        self.head_name, self.head = find_head(model, None if head == "auto" else head)
        self.dtype, self.progress = dtype, progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = next(model.parameters()).device
        self.state = {n: t.detach().to(dtype) if t.is_floating_point() else t.detach()
                      for n, t in list(model.named_parameters()) + list(model.named_buffers())}

    def __call__(self, x: Tensor) -> Tensor:
        """The head's inputs for `x`, (b, *feature_shape), in the computation dtype."""
        seen: list[Tensor] = []
        outputs: list[Any] = []

        def hook(module, inputs, output):
            seen.append(inputs[0].detach())
            outputs.append(output)

        x = x.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        handle = self.head.register_forward_hook(hook)
        try:
            with torch.no_grad():
                out = functional_call(self.model, self.state, (x,))
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(f"head {self.head_name!r} must be called exactly once per forward pass, "
                             f"it was called {len(seen)} times")
        if outputs[0] is not out:
            raise ValueError(f"head {self.head_name!r}: its output is not the model's output, so the model "
                             "is not backbone -> head; pass head= the last module")
        return seen[0].to(self.dtype) if seen[0].is_floating_point() else seen[0]

    def cache(self, samples: Samples) -> Samples:
        """One backbone pass over `samples`; returns Samples over the cached (features, targets).

        With ``cache_dir``, the features are written block by block into
        ``cache_dir/train_features.npy`` (in the computation dtype), so the
        training set's features never have to fit in memory.
        """
        n = samples.count()
        sink: Optional[DenseSink] = None
        targets = []
        for block in tqdm(samples.blocks(), desc="backbone features", disable=not self.progress):
            features = self(block.x)
            if sink is None:
                shape = (n, *features.shape[1:])
                sink = (MemmapSink(self.cache_dir / "train_features.npy", shape, dtype=self.dtype, sample_dim=0)
                        if self.cache_dir is not None
                        else DenseSink(shape, dtype=self.dtype, device=features.device, sample_dim=0))
            sink.write(features, block.offset)
            targets.append(block.y)
        return Samples((sink.result(), torch.cat(targets)), samples.name, samples.block_size, check=samples.check)


def HeadInfluence(solver: type, model: nn.Module, loss, regularization: float = 0.0, *,  # noqa: N802 - a class's name
                  head: Optional[HeadSpec] = None, cache_dir: Optional[Union[str, Path]] = None,
                  batch_size: int = 256, **solver_kwargs: Any):
    """`solver` on `model`'s trainable head over cached backbone features.

    The same as ``solver(model, loss, regularization, head=head or "auto",
    cache_dir=cache_dir, block_size=batch_size, **solver_kwargs)``: the result is
    an instance of `solver`, with its whole API (inputs are the model's inputs;
    factors are (n_test, p_head)).

    Args:
        solver: the solver class, e.g. ``CgInfluence`` or ``EkfacInfluence``.
        model: the full model; the head is its trainable part.
        head: the head module or its name (default: the smallest submodule holding
            every parameter with ``requires_grad``). Its output must be the model's output.
        cache_dir: keep the training features in a memory-mapped file there.
        batch_size: samples per backbone pass and per head block.
    """
    from .influence import InfluenceFunctionModel

    if not (isinstance(solver, type) and issubclass(solver, InfluenceFunctionModel)):
        raise TypeError(f"solver must be an InfluenceFunctionModel subclass, got {solver!r}")
    return solver(model, loss, regularization, head="auto" if head is None else head, cache_dir=cache_dir,
                  block_size=batch_size, **solver_kwargs)


def find_head(model: nn.Module, head: Optional[HeadSpec]) -> tuple[str, nn.Module]:
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
    if head is not None:
        raise TypeError(f"head must be a module, a submodule's name or 'auto', got {type(head).__name__}")
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
