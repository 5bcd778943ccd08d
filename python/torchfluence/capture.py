"""Layer capture: per-sample input activations and output gradients of weight layers.

A layer ``out = W a (+ b)`` applied at T positions (1 for a plain Linear, the
patches of a convolution, the tokens of a sequence) has the per-sample gradient

    dL_i/dW = sum_t g_it a_it^T            (d_out, d_in)

where ``a_it`` is the input at position t and ``g_it = dL_i/d out_it``. One
forward and one backward over a batch give every ``a`` and ``g``, so per-sample
gradients of such layers need no ``vmap``, and Kronecker-factored curvature
(K-FAC) reads its factors straight from them. A bias is folded in as a constant
input 1 (``d_in + 1`` columns).

``nn.Linear`` and ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (groups=1, zero padding)
are built in (convolutions through their patches: patches are positions, Grosse &
Martens 2016). Other layers of
the form ``out = W a`` are added with :func:`register_layer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._functional import ModelFunctions

ActivationsFn = Callable[[nn.Module, Tensor], Tensor]
OutputGradsFn = Callable[[nn.Module, Tensor], Tensor]


@dataclass(frozen=True)
class LayerRule:
    """How one module type exposes its matrix form.

    Attributes:
        activations: ``(module, input) -> (n, T, d_in)``; row t is what the weight
            matrix multiplies at position t.
        output_grads: ``(module, grad_of_output) -> (n, T, d_out)`` in the same
            position order.
    The module's ``weight`` must reshape row-major to (d_out, d_in) and its
    optional ``bias`` have d_out entries.
    """

    activations: ActivationsFn
    output_grads: OutputGradsFn


_RULES: dict[type, LayerRule] = {}


def register_layer(module_type: type, activations: ActivationsFn, output_grads: OutputGradsFn) -> None:
    """Makes `module_type` capturable (and so usable by K-FAC and the fused paths).

    Example, a layer applying its weight (d_out, d_in) to every token of a (n, T, d_in) input
    written as ``torch.einsum("ntd,od->nto", x, self.weight)``::

        register_layer(
            TokenProjection,
            activations=lambda m, x: x,        # (n, T, d_in): positions are tokens
            output_grads=lambda m, g: g,       # (n, T, d_out)
        )
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer: module_type must be an nn.Module subclass, got {module_type!r}")
    _RULES[module_type] = LayerRule(activations, output_grads)


def _linear_activations(module: nn.Linear, x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _linear_output_grads(module: nn.Linear, g: Tensor) -> Tensor:
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _conv2d_activations(module: nn.Conv2d, x: Tensor) -> Tensor:
    padding = module.padding
    if isinstance(padding, str):  # "valid" or "same"; "same" may pad unevenly, which unfold cannot
        if padding == "valid":
            padding = (0, 0)
        else:
            pads = []
            for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x, padding = F.pad(x, pads), (0, 0)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return patches.transpose(1, 2)  # (n, positions, c_in * kh * kw)


def _conv2d_output_grads(module: nn.Conv2d, g: Tensor) -> Tensor:
    return g.flatten(2).transpose(1, 2)  # (n, positions, c_out)


def _conv_nd_activations(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Patches of a 1-d or 3-d convolution, (n, positions, c_in * prod(kernel)), in the weight's order.

    ``F.unfold`` is 2-d only; here each spatial dimension is windowed with
    ``Tensor.unfold`` (a view) over the zero-padded input. A dilated window is
    taken as the full span and thinned to every d-th element.
    """
    dims = len(module.kernel_size)
    padding = module.padding
    if isinstance(padding, str):
        padding = (0,) * dims
        if module.padding == "same":
            pads = []
            for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
    else:
        x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    for axis, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + axis, d * (k - 1) + 1, s)  # appends a window dimension
        if d > 1:
            x = x[..., ::d]
    # (n, c, out_1..out_dims, k_1..k_dims) -> (n, out_1 * .. * out_dims, c * k_1 * .. * k_dims)
    n, c = x.shape[:2]
    out_dims = list(range(2, 2 + dims))
    kernel_dims = list(range(2 + dims, 2 + 2 * dims))
    return x.permute(0, *out_dims, 1, *kernel_dims).reshape(n, -1, c * math.prod(module.kernel_size))


register_layer(nn.Linear, _linear_activations, _linear_output_grads)
register_layer(nn.Conv2d, _conv2d_activations, _conv2d_output_grads)
register_layer(nn.Conv1d, _conv_nd_activations, _conv2d_output_grads)
register_layer(nn.Conv3d, _conv_nd_activations, _conv2d_output_grads)


def _unsupported_reason(module: nn.Module) -> Optional[str]:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return f"groups={module.groups} (only 1 is supported)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    return None


@dataclass
class Layer:
    """A captured layer and where its parameters sit in the flat parameter vector.

    Attributes:
        name: module name in the model.
        weight_slice, bias_slice: ranges in the flat vector (bias: None if absent or frozen).
        d_out, d_in: matrix shape of the weight (without the bias column).
    """

    name: str
    module: nn.Module
    rule: LayerRule
    weight_slice: slice
    bias_slice: Optional[slice]
    d_out: int
    d_in: int

    @property
    def d_in_total(self) -> int:
        """Input width including the bias column."""
        return self.d_in + (self.bias_slice is not None)

    def matrices(self, flat: Tensor) -> Tensor:
        """(k, p) flat vectors -> (k, d_out, d_in_total) matrices of this layer (bias last column)."""
        w = flat[:, self.weight_slice].reshape(flat.shape[0], self.d_out, self.d_in)
        if self.bias_slice is None:
            return w
        return torch.cat([w, flat[:, self.bias_slice].unsqueeze(-1)], dim=-1)

    def write(self, matrices: Tensor, flat: Tensor) -> None:
        """Inverse of :meth:`matrices`: writes (k, d_out, d_in_total) into the rows of `flat` (k, p)."""
        k = matrices.shape[0]
        flat[:, self.weight_slice] = matrices[..., :self.d_in].reshape(k, -1)
        if self.bias_slice is not None:
            flat[:, self.bias_slice] = matrices[..., self.d_in]


def find_layers(functions: ModelFunctions) -> tuple[list[Layer], list[str]]:
    """The capturable layers among the selected parameters, and the parameter names they miss.

    A layer is captured when its weight is selected; its bias joins it when selected too.
    """
    offsets, start = {}, 0
    for name, size in zip(functions.names, functions.sizes):
        offsets[name] = slice(start, start + size)
        start += size
    layers, covered = [], set()
    for module_name, module in functions.model.named_modules():
        rule = next((r for t, r in _RULES.items() if type(module) is t), None)
        if rule is None:
            rule = next((r for t, r in _RULES.items() if isinstance(module, t)), None)
        prefix = f"{module_name}." if module_name else ""
        weight_name, bias_name = prefix + "weight", prefix + "bias"
        if rule is None or weight_name not in offsets or _unsupported_reason(module) is not None:
            continue
        weight = module.weight
        bias_slice = offsets.get(bias_name) if getattr(module, "bias", None) is not None else None
        layers.append(Layer(module_name or "<root>", module, rule, offsets[weight_name], bias_slice,
                            weight.shape[0], weight[0].numel()))
        covered.update([weight_name] + ([bias_name] if bias_slice is not None else []))
    missing = [n for n in functions.names if n not in covered]
    return layers, missing


def describe_missing(functions: ModelFunctions, missing: Sequence[str]) -> str:
    """Names the modules (and their types) that own uncaptured parameters, for error messages."""
    modules = dict(functions.model.named_modules())
    owners = []
    for name in missing:
        module_name = name.rpartition(".")[0]
        module = modules.get(module_name)
        kind = type(module).__name__ if module is not None else "?"
        reason = _unsupported_reason(module) if module is not None else None
        if module is not None and not any(isinstance(module, t) for t in _RULES):
            reason = "type not registered"
        elif reason is None:
            reason = "its weight is not among the selected parameters"
        owners.append(f"{name} ({kind}: {reason})")
    return ", ".join(owners)


@dataclass
class Captured:
    """One batch's capture for each layer: activations (n, T, d_in_total), output gradients (n, T, d_out).

    ``outputs`` are the model's (detached) outputs on the batch.
    """

    activations: list[Tensor]
    output_grads: list[Tensor]
    outputs: Tensor

    def per_sample_grads(self, layers: Sequence[Layer], num_params: int, out: Optional[Tensor] = None) -> Tensor:
        """Per-sample gradients of the captured layers as flat vectors, (n, p) (uncaptured entries 0).

        With `out` (n, p), they are written there (no second (n, p) block).
        """
        n = self.outputs.shape[0]
        flat = self.activations[0].new_zeros(n, num_params) if out is None else out.zero_()
        for layer, a, g in zip(layers, self.activations, self.output_grads):
            layer.write(torch.einsum("nto,nti->noi", g, a), flat)
        return flat


def capture(functions: ModelFunctions, layers: Sequence[Layer], x: Tensor, y: Optional[Tensor] = None,
            sample_targets: Optional[Callable[[Tensor], Tensor]] = None,
            output_grads: Optional[Callable[[Tensor], Tensor]] = None) -> Captured:
    """One forward and backward over (x, y), recording each layer's inputs and output gradients.

    The gradients are those of each sample's own loss (the batch's mean loss
    times n), so ``sum_t g a^T`` is a per-sample gradient. With
    ``sample_targets``, targets are drawn from the model's outputs instead of
    taken from y (for the true Fisher). With ``output_grads`` (outputs ->
    (K, n, *outputs.shape[1:])), K backward passes start from those output
    gradients instead of the loss's, and each layer's gradients have shape
    (K, n, T, d_out).

    Returns:
        :class:`Captured` with one (n, T, d_in_total) and one (n, T, d_out) tensor per layer.
    """
    x = functions.cast_input(x)
    records: dict[int, list[tuple[Tensor, Tensor]]] = {id(layer.module): [] for layer in layers}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        records[id(module)].append((inputs[0].detach(), output))

    handles = [layer.module.register_forward_hook(hook) for layer in layers]
    try:
        with torch.enable_grad():
            theta = functions.theta.detach().requires_grad_(True)
            outputs = functions.outputs(theta, x)
            layer_outputs = [out for layer in layers for _, out in records[id(layer.module)]]
            if output_grads is None:
                targets = sample_targets(outputs.detach()) if sample_targets is not None else y.to(functions.device)
                total = functions.loss(outputs, targets) * x.shape[0]
                grads = iter(torch.autograd.grad(total, layer_outputs, allow_unused=True))
            else:
                basis = output_grads(outputs.detach())
                passes = [torch.autograd.grad(outputs, layer_outputs, v, retain_graph=True, allow_unused=True)
                          for v in basis]
                grads = iter([_stack_or_none(parts) for parts in zip(*passes)])
    finally:
        for handle in handles:
            handle.remove()
    activations, gradients = [], []
    for layer in layers:
        calls = records[id(layer.module)]
        if not calls:
            raise RuntimeError(f"layer {layer.name!r} was not called in the model's forward pass")
        a_parts, g_parts = [], []
        for inp, out in calls:
            g = next(grads)
            a = layer.rule.activations(layer.module, inp)
            if layer.bias_slice is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            a_parts.append(a)
            if output_grads is None:
                g = torch.zeros_like(out) if g is None else g
                g_parts.append(layer.rule.output_grads(layer.module, g.detach()))
            else:
                g = torch.zeros(len(basis), *out.shape, dtype=out.dtype, device=out.device) if g is None else g
                g_parts.append(torch.stack([layer.rule.output_grads(layer.module, gk.detach()) for gk in g]))
        # A layer called several times (shared weights) adds its calls' positions.
        # torch.cat copies even a single part: a layer called once keeps its tensors as they are.
        activations.append(a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1))
        gradients.append(g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts, dim=-2))
    return Captured(activations, gradients, outputs.detach())


def _stack_or_none(parts: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    return None if any(p is None for p in parts) else torch.stack(parts)
