"""Head mode's backbone: features computed once per sample for a trainable head.

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

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx as fx
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
        split: the (backbone, tail) of :func:`split_trainable_tail`, if already found.
    """

    def __init__(self, model: nn.Module, head: HeadSpec, dtype: torch.dtype,
                 cache_dir: Optional[Union[str, Path]] = None, progress: bool = False,
                 split: Optional[tuple[fx.GraphModule, fx.GraphModule]] = None) -> None:
        self.model = model
        self.backbone: Optional[fx.GraphModule] = None
        if head == "auto":
            split = split_trainable_tail(model) if split is None else split
            single = None if split is None else _single_module(split[1])
            if single is not None:  # the tail is one module (a linear head): keep it, for its closed forms
                head = single
            elif split is not None:  # the trainable tail of a traced graph: the general case
                self.backbone, self.head = split
                self.head_name = "<trainable tail>"
        if self.backbone is None:
            self.head_name, self.head = find_head(model, None if head == "auto" else head)
        self.dtype, self.progress = dtype, progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_path: Optional[Path] = None  # the training features' file in cache_dir, once cached
        self.device = next(model.parameters()).device
        source = self.backbone if self.backbone is not None else model
        self.state = {n: t.detach().to(dtype) if t.is_floating_point() else t.detach()
                      for n, t in list(source.named_parameters()) + list(source.named_buffers())}

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
        if self.backbone is not None:
            with torch.no_grad():
                features = functional_call(self.backbone, self.state, (x,))
            return features.to(self.dtype) if features.is_floating_point() else features
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

        With ``cache_dir``, the features are written block by block into a file of
        their own (in the computation dtype), so the training set's features never
        have to fit in memory. The file is named by a digest of what it holds,
        ``cache_dir/train_features-<digest>.npy`` (:attr:`cache_path`): solvers that
        share a ``cache_dir`` never write into each other's file (one with the same
        features replaces it by an identical one), and a rerun never reads another
        fit's features.
        """
        n = samples.count()
        sink: Optional[DenseSink] = None
        targets = []
        partial = None
        for block in tqdm(samples.blocks(), desc="backbone features", disable=not self.progress):
            features = self(block.x)
            if sink is None:
                shape = (n, *features.shape[1:])
                if self.cache_dir is not None:
                    # Written under a name no other solver uses, then renamed to its digest.
                    partial = self.cache_dir / f"train_features.{os.getpid()}.{uuid.uuid4().hex}.partial.npy"
                    sink = MemmapSink(partial, shape, dtype=self.dtype, sample_dim=0)
                else:
                    sink = DenseSink(shape, dtype=self.dtype, device=features.device, sample_dim=0)
            sink.write(features, block.offset)
            targets.append(block.y)
        features = sink.result()
        if partial is not None:
            sink.flush()
            digest = hashlib.blake2b(digest_size=12)
            for start in range(0, n, 4096):  # in slices: the file need not fit in memory
                digest.update(features[start:start + 4096].numpy().tobytes())
            self.cache_path = self.cache_dir / f"train_features-{digest.hexdigest()}.npy"
            os.replace(partial, self.cache_path)  # the mapping stays valid: same file, new name
        return Samples((features, torch.cat(targets)), samples.name, samples.block_size, check=samples.check,
                       minibatch_size=samples.minibatch_size)


def split_trainable_tail(model: nn.Module) -> Optional[tuple[fx.GraphModule, fx.GraphModule]]:
    """(backbone, tail) with ``model(x) == tail(backbone(x))`` and every trainable parameter in the tail.

    The model is traced with ``torch.fx``; the tail starts at the first operation
    that uses a trainable parameter, and the split is taken only when everything
    after that point reads a single tensor computed before it (the features),
    besides parameters and buffers. The tail keeps the model's parameter names.

    Returns None when the model cannot be traced, has no frozen prefix, or its
    trainable part reads more than one tensor of the frozen part.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable or len(trainable) == sum(1 for _ in model.parameters()):
        return None
    try:
        traced = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: no automatic split
        return None
    nodes = list(traced.graph.nodes)

    def uses_trainable(node: fx.Node) -> bool:
        if node.op == "call_module":
            prefix = f"{node.target}."
            return any(name.startswith(prefix) for name in trainable)
        return node.op == "get_attr" and node.target in trainable

    first = next((i for i, node in enumerate(nodes) if uses_trainable(node)), None)
    if first is None:
        return None
    tail_nodes = nodes[first:]
    inside = set(tail_nodes)
    boundary = {arg for node in tail_nodes for arg in node.all_input_nodes if arg not in inside
                and arg.op != "get_attr"}
    if len(boundary) != 1:
        return None
    (features,) = boundary
    if features.op == "placeholder":  # nothing frozen in front: no backbone to skip
        return None
    if any(n.op == "placeholder" for node in tail_nodes for n in node.all_input_nodes):
        return None

    backbone_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes[:first]:
        if node.op == "output":
            continue
        env[node] = backbone_graph.node_copy(node, lambda n: env[n])
    backbone_graph.output(env[features])
    tail_graph = fx.Graph()
    env = {features: tail_graph.placeholder("features")}
    for node in nodes[:first]:
        if node.op == "get_attr":
            env[node] = tail_graph.node_copy(node, lambda n: env[n])
    for node in tail_nodes:
        env[node] = tail_graph.node_copy(node, lambda n: env[n])
    backbone, tail = fx.GraphModule(traced, backbone_graph), fx.GraphModule(traced, tail_graph)
    tail.train(model.training)
    backbone.train(model.training)
    return backbone, tail


def _single_module(tail: fx.GraphModule) -> Optional[str]:
    """The name of the one module the tail calls, when the tail is nothing else."""
    ops = [node for node in tail.graph.nodes if node.op not in ("placeholder", "output")]
    if len(ops) == 1 and ops[0].op == "call_module":
        return str(ops[0].target)
    return None


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
