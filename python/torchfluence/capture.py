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
Martens 2016), and so is Hugging Face's ``Conv1D`` (GPT-2's projections: ``x @ W + b``
with W stored (d_in, d_out), a transposed Linear) once ``transformers`` is imported.
Other layers of the form ``out = W a`` are added with :func:`register_layer`.

Parameters of other modules (``nn.LayerNorm``, ``nn.BatchNorm*``, RMSNorm-style
modules, bare ``nn.Parameter`` tensors such as ViT's class token) are not captured:
the fused scoring path differentiates them with ``torch.func`` beside the captured
layers, and K-FAC / EK-FAC leave them out of the curvature (:func:`describe_coverage`).

``nn.Embedding`` is an *index layer*: its input at position t is the one-hot
vector of the token id, never formed. Its activations are the (n, T) integer ids
themselves, and its per-sample gradient ``sum_t onehot(id_t) g_t^T`` is a
scatter of the output gradients into the rows of the ids (the weight is stored
(num_embeddings, embedding_dim), i.e. (d_in, d_out), transposed with respect to
a Linear's). Positions holding ``padding_idx`` get no gradient. Scoring gathers
query rows at the ids (:func:`torchfluence.psg_dot` takes the ids as
activations), and K-FAC's activation covariance is diagonal (the token
frequencies), so memory never scales with vocabulary x positions.

A weight shared by several modules (an embedding tied to the output layer)
is captured once per module, and the modules' gradients add up.

A layer applied to an input shared by the whole batch, with a leading dimension
of 1 (GPT-2's and BERT's position embeddings on ``(1, T)`` position ids), gets
its exact per-sample gradient ``sum_t g_it a_t^T``: during a capture its output
is expanded to the batch's n samples (a view, which every broadcasting use of it
reads the same), so each sample's output gradient ``g_it`` is recorded apart.

Where a weight is also used outside its module's forward, or a layer is applied
to a tensor without the batch dimension, captured gradients would be wrong: the
first capture of a set of layers checks the first sample's captured gradients
against autograd and raises if they differ.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import conv_covariance
from ._functional import _STOCHASTIC_MODULES, ModelFunctions
from .captured_scores import index_sum
from .precision import factor_matmul

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
        index: an index layer (``nn.Embedding``): activations are (n, T) integer
            indices into the d_in rows of a weight stored (d_in, d_out).
        transposed: a dense layer whose weight is stored (d_in, d_out) (Hugging Face's
            ``Conv1D``: ``x @ W + b``).
    Otherwise the module's ``weight`` must reshape row-major to (d_out, d_in) and
    its optional ``bias`` have d_out entries.
    """

    activations: ActivationsFn
    output_grads: OutputGradsFn
    index: bool = False
    transposed: bool = False


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


def _conv2d_pads(module: nn.Conv2d) -> list[int]:
    """Zero padding of a 2-d convolution as ``F.pad``'s [left, right, top, bottom]."""
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    if isinstance(module.padding, str):  # "valid" or "same"; "same" may pad unevenly
        if module.padding == "valid":
            return [0, 0, 0, 0]
        pads = []
        for k, d in ((kw, dw), (kh, dh)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    ph, pw = module.padding
    return [pw, pw, ph, ph]


def _conv2d_out_size(module: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    """Output height and width of a 2-d convolution on an (already padded) h x w input."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    return (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1


def _conv2d_activations(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Patches of a 2-d convolution, (n, positions, c_in * kh * kw), in the weight's order.

    On a CPU, kh * kw strided copies of the padded input into one contiguous buffer
    laid out (n, out_h, out_w, c_in, kh, kw): on 2 cores 2-6x faster than
    ``F.unfold`` (im2col) followed by the transposing copy its (n, d_in, T) layout
    needs before any GEMM over positions. On a GPU, ``F.unfold``'s one im2col
    kernel, as a transposed view: the route the GPU measurements were taken on
    (the strided copies write 4-byte elements kh * kw apart, uncoalesced there).
    """
    pads = _conv2d_pads(module)
    if any(pads):
        x = F.pad(x, pads)
    return (_strided_patches if x.device.type == "cpu" else _unfold_patches)(module, x)


def _unfold_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Patches of an already padded input by ``F.unfold``: a (n, positions, c_in * kh * kw) transposed view."""
    return F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride).transpose(1, 2)


def _strided_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Patches of an already padded input by kh * kw strided copies: (n, positions, c_in * kh * kw) contiguous."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    n, c, h, w = x.shape
    out_h, out_w = _conv2d_out_size(module, h, w)
    patches = x.new_empty(n, out_h, out_w, c, kh, kw)
    for i in range(kh):
        for j in range(kw):
            window = x[:, :, i * dh:i * dh + sh * (out_h - 1) + 1:sh, j * dw:j * dw + sw * (out_w - 1) + 1:sw]
            patches[..., i, j] = window.permute(0, 2, 3, 1)
    return patches.view(n, out_h * out_w, c * kh * kw)


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


def _embedding_indices(module: nn.Embedding, ids: Tensor) -> Tensor:
    return ids.reshape(ids.shape[0], -1)  # (n, T): any (n, ...) ids, positions flattened


register_layer(nn.Linear, _linear_activations, _linear_output_grads)
register_layer(nn.Conv2d, _conv2d_activations, _conv2d_output_grads)
register_layer(nn.Conv1d, _conv_nd_activations, _conv2d_output_grads)
register_layer(nn.Conv3d, _conv_nd_activations, _conv2d_output_grads)
_RULES[nn.Embedding] = LayerRule(_embedding_indices, _linear_output_grads, index=True)


def _register_installed_types() -> None:
    """Registers layer types of libraries the model may come from, once they are imported.

    Hugging Face's ``Conv1D`` is ``x @ W + b`` with W (d_in, d_out): a Linear with its
    weight stored transposed. transformers is never imported here: a model holding one
    has imported it already.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    if isinstance(conv1d, type) and conv1d not in _RULES:
        _RULES[conv1d] = LayerRule(_linear_activations, _linear_output_grads, transposed=True)


def _unsupported_reason(module: nn.Module) -> Optional[str]:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return f"groups={module.groups} (only 1 is supported)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return f"max_norm={module.max_norm} (the forward pass renormalises the weight)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True (its gradient depends on the batch's token counts)"
    return None


@dataclass
class Layer:
    """A captured layer and where its parameters sit in the flat parameter vector.

    Attributes:
        name: module name in the model.
        weight_slice, bias_slice: ranges in the flat vector (bias: None if absent or frozen).
        d_out, d_in: matrix shape of the weight (without the bias column); for an
            index layer d_in is the number of rows (the vocabulary).
        index: an index layer (``nn.Embedding``): activations are (n, T) integer ids
            and the weight is stored (d_in, d_out).
        transposed: the weight is stored (d_in, d_out) (an index layer's always is;
            Hugging Face's ``Conv1D``'s too).
        verified: whether a capture already checked this layer against autograd.
    """

    name: str
    module: nn.Module
    rule: LayerRule
    weight_slice: slice
    bias_slice: Optional[slice]
    d_out: int
    d_in: int
    index: bool = False
    verified: bool = False
    transposed: bool = False

    def __post_init__(self) -> None:
        self.transposed = self.transposed or self.index

    @property
    def d_in_total(self) -> int:
        """Input width including the bias column."""
        return self.d_in + (self.bias_slice is not None)

    def columns(self) -> list[slice]:
        """The layer's ranges in the flat parameter vector."""
        return [self.weight_slice] + ([self.bias_slice] if self.bias_slice is not None else [])

    def matrices(self, flat: Tensor) -> Tensor:
        """(k, p) flat vectors -> (k, d_out, d_in_total) matrices of this layer (bias last column).

        For a layer stored transposed (an index layer) this is a transposed view of its (d_in, d_out) rows.
        """
        if self.transposed:
            w = flat[:, self.weight_slice].view(flat.shape[0], self.d_in, self.d_out).transpose(1, 2)
        else:
            w = flat[:, self.weight_slice].reshape(flat.shape[0], self.d_out, self.d_in)
        if self.bias_slice is None:
            return w
        return torch.cat([w, flat[:, self.bias_slice].unsqueeze(-1)], dim=-1)

    def write(self, matrices: Tensor, flat: Tensor) -> None:
        """Inverse of :meth:`matrices`: writes (k, d_out, d_in_total) into the rows of `flat` (k, p)."""
        k = matrices.shape[0]
        weight = matrices[..., :self.d_in]
        flat[:, self.weight_slice] = (weight.transpose(1, 2) if self.transposed else weight).reshape(k, -1)
        if self.bias_slice is not None:
            flat[:, self.bias_slice] = matrices[..., self.d_in]

    def query_rows(self, flat: Tensor) -> Tensor:
        """(k, p) vectors -> (k, width) in the layout the layer's scoring reads.

        A dense layer: its (d_out, d_in_total) matrices flattened; an index layer:
        its weight as stored, (d_in, d_out) row-major, so a token's row is contiguous.
        """
        if self.index:
            return flat[:, self.weight_slice]
        return self.matrices(flat).flatten(1)

    def add_grads(self, activations: Tensor, output_grads: Tensor, flat: Tensor) -> None:
        """Adds the per-sample gradients ``sum_t g_t a_t^T`` of n samples to the rows of `flat` (n, p).

        Args:
            activations: (n, T, d_in_total), or (n, T) integer ids for an index layer.
            output_grads: (n, T, d_out).
        """
        n = output_grads.shape[0]
        if self.index:
            keys = (torch.arange(n, device=activations.device).unsqueeze(1) * self.d_in + activations).reshape(-1)
            grads = index_sum(keys, output_grads.reshape(-1, self.d_out), n * self.d_in)
            flat[:, self.weight_slice] += grads.view(n, -1).to(flat.dtype)
            return
        self.add_matrices(torch.einsum("nto,nti->noi", output_grads, activations), flat)

    def add_matrices(self, grads: Tensor, flat: Tensor) -> None:
        """Adds per-sample gradients given as (n, d_out, d_in_total) matrices to the rows of `flat` (n, p)."""
        n = grads.shape[0]
        weight = grads[..., :self.d_in]
        flat[:, self.weight_slice] += (weight.transpose(1, 2) if self.transposed else weight).reshape(n, -1).to(
            flat.dtype)
        if self.bias_slice is not None:
            flat[:, self.bias_slice] += grads[..., self.d_in].to(flat.dtype)

    def term_norms(self, activations: Tensor, output_grads: Tensor) -> Tensor:
        """sum_t ||g_t|| ||a_t|| per sample, (n,): a bound on each per-sample gradient's norm."""
        g = output_grads.norm(dim=-1)
        return (g if self.index else g * activations.norm(dim=-1)).sum(dim=1)


def find_layers(functions: ModelFunctions) -> tuple[list[Layer], list[str]]:
    """The capturable layers among the selected parameters, and the parameter names they miss.

    A layer is captured when its weight is selected; its bias joins it when selected too.
    Parameters are matched by identity, so a weight shared by several modules (tied
    embedding and output layer) gives one layer per module, on the same range of the
    flat vector: their gradients add up (see :func:`shared_weights`).
    """
    offsets, start = {}, 0
    for name, size in zip(functions.names, functions.sizes):
        offsets[name] = slice(start, start + size)
        start += size
    # named_parameters() names a shared parameter once, after its first owner.
    name_of = {id(p): n for n, p in functions.model.named_parameters()}
    functional = _functional_submodules(functions.model)
    _register_installed_types()
    layers, covered = [], set()
    for module_name, module in functions.model.named_modules():
        if id(module) in functional:
            continue
        rule = next((r for t, r in _RULES.items() if type(module) is t), None)
        if rule is None:
            rule = next((r for t, r in _RULES.items() if isinstance(module, t)), None)
        weight = getattr(module, "weight", None)
        weight_name = name_of.get(id(weight)) if isinstance(weight, nn.Parameter) else None
        if rule is None or weight_name not in offsets or _unsupported_reason(module) is not None:
            continue
        bias = getattr(module, "bias", None)
        bias_name = name_of.get(id(bias)) if isinstance(bias, nn.Parameter) else None
        bias_slice = offsets.get(bias_name) if bias_name is not None else None
        transposed = rule.index or rule.transposed
        d_out, d_in = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight[0].numel())
        layers.append(Layer(module_name or "<root>", module, rule, offsets[weight_name], bias_slice,
                            d_out, d_in, index=rule.index, transposed=transposed))
        covered.update([weight_name] + ([bias_name] if bias_slice is not None else []))
    missing = [n for n in functions.names if n not in covered]
    return layers, missing


def _functional_submodules(model: nn.Module) -> set[int]:
    """ids of modules whose weights their parent uses without calling them (MultiheadAttention's out_proj)."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def shared_weights(layers: Sequence[Layer]) -> list[list[str]]:
    """Groups of (at least two) layer names whose parameters overlap in the flat vector (tied weights)."""
    groups: list[list[str]] = []
    seen: dict[tuple[int, int], list[str]] = {}
    for layer in layers:
        for s in layer.columns():
            seen.setdefault((s.start, s.stop), []).append(layer.name)
    for names in seen.values():
        unique = list(dict.fromkeys(names))
        if len(unique) > 1 and unique not in groups:
            groups.append(unique)
    return groups


def _missing_reasons(functions: ModelFunctions, missing: Sequence[str]) -> list[tuple[str, str, str]]:
    """(name, owner type, why it is not captured) of each uncaptured parameter."""
    modules = dict(functions.model.named_modules())
    functional = _functional_submodules(functions.model)
    reasons = []
    for name in missing:
        module_name = name.rpartition(".")[0]
        module = modules.get(module_name)
        kind = type(module).__name__ if module is not None else "?"
        reason = _unsupported_reason(module) if module is not None else None
        if module is not None and id(module) in functional:
            reason = "its parent calls F.multi_head_attention_forward with it, not its forward"
        elif module is not None and not any(isinstance(module, t) for t in _RULES):
            reason = "type not registered"
        elif reason is None:
            reason = "its weight is not among the selected parameters"
        reasons.append((name, kind, reason))
    return reasons


def describe_missing(functions: ModelFunctions, missing: Sequence[str]) -> str:
    """Names the modules (and their types) that own uncaptured parameters, for error messages."""
    return ", ".join(f"{name} ({kind}: {reason})" for name, kind, reason in _missing_reasons(functions, missing))


def tied_parameters(functions: ModelFunctions, layers: Sequence[Layer]) -> list[str]:
    """Names of the selected parameters used by several captured layers (a tied embedding and output layer)."""
    users: dict[int, int] = {}
    for layer in layers:
        for s in layer.columns():
            users[s.start] = users.get(s.start, 0) + 1
    starts = torch.tensor([0, *functions.sizes]).cumsum(0).tolist()
    return [name for name, start in zip(functions.names, starts) if users.get(start, 0) > 1]


def describe_coverage(functions: ModelFunctions, layers: Sequence[Layer], left_out: Sequence[str]) -> str:
    """One line: which parameters the captured layers cover, and which are left out and why.

    Args:
        layers: the captured layers kept; left_out: names of the selected parameters left out
            (uncaptured, or tied between layers).
    """
    sizes = dict(zip(functions.names, functions.sizes))
    tied = set(tied_parameters(functions, find_layers(functions)[0]))
    groups: dict[str, list[str]] = {}
    for name, kind, reason in _missing_reasons(functions, [n for n in left_out if n not in tied]):
        why = "not a captured layer type" if reason == "type not registered" else reason
        groups.setdefault(f"{kind} ({why})", []).append(name)
    for name in left_out:
        if name in tied:
            groups.setdefault("tied weights (shared by several layers)", []).append(name)
    kept = sum(sizes[n] for n in functions.names if n not in set(left_out))
    types = sorted({type(layer.module).__name__ for layer in layers})
    parts = [f"{what}: {len(names)} parameter(s) such as {names[0]}" for what, names in groups.items()]
    return (f"covers {len(layers)} captured layers ({', '.join(types)}; {kept:,} values) and leaves out "
            f"{sum(sizes[n] for n in left_out):,} values: {'; '.join(parts)}")


class ConvInput:
    """A 2-d convolution's input, kept whole: its patches are formed only when asked for.

    Per-sample weight gradients come from it without patches (:meth:`grads`), so a
    pass that needs only those never writes the (n, positions, c_in * kh * kw) tensor.
    """

    def __init__(self, module: nn.Conv2d, x: Tensor, bias: bool) -> None:
        self.module, self.x, self.bias = module, x, bias

    def patches(self) -> Tensor:
        """(n, T, d_in_total): the layer's activations, bias column last."""
        a = _conv2d_activations(self.module, self.x)
        return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if self.bias else a

    def covariance(self, operand_dtype: Optional[torch.dtype] = None) -> Tensor:
        """``sum_{n,t} a_nt a_nt^T`` over the patches (bias column last), (d_in_total, d_in_total).

        On a CPU, for stride-1 convolutions at 8 or more output rows, from row-shift
        correlations of the input (:mod:`torchfluence.conv_covariance`), with no patches.
        With `operand_dtype` (16-bit) the patches are rounded to it and the sums run in
        float32 (:func:`~torchfluence.precision.factor_matmul`); the patches hold the
        input's values, so on the CPU route the input is rounded instead.
        """
        pads = _conv2d_pads(self.module)
        if self.x.device.type == "cpu" and conv_covariance.applies(self.module, self.x, pads):
            x = self.x if operand_dtype is None else self.x.to(operand_dtype).to(self.x.dtype)
            return conv_covariance.patch_covariance(self.module, x, pads, self.bias)
        return gram(self.patches(), operand_dtype)

    def grads(self, output_grads: Tensor, start: int, stop: int) -> Tensor:
        """Per-sample gradients of samples start..stop, (b, d_out, d_in_total), from (n, T, d_out) output gradients.

        One convolution backward with the samples as groups: on 2 CPU cores 2-9x
        faster than forming the patches and multiplying at 16 or more positions per
        sample (e.g. 8 -> 16 channels at 32 x 32: 3.1 ms against 27 ms for 128 samples).
        """
        m = self.module
        x = self.x[start:stop]
        b, c = x.shape[:2]
        pads = _conv2d_pads(m)
        padding = (pads[2], pads[0])
        if pads[0] != pads[1] or pads[2] != pads[3]:  # uneven "same" padding: pad first
            x, padding = F.pad(x, pads), (0, 0)
        out_h, out_w = _conv2d_out_size(m, x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1])
        g = output_grads[start:stop]  # (b, T, d_out)
        d_out = g.shape[2]
        g_map = g.transpose(1, 2).reshape(1, b * d_out, out_h, out_w)
        weight = torch.nn.grad.conv2d_weight(x.reshape(1, b * c, *x.shape[2:]), (b * d_out, c, *m.kernel_size),
                                             g_map, m.stride, padding, m.dilation, groups=b)
        weight = weight.view(b, d_out, -1)
        return torch.cat([weight, g.sum(dim=1).unsqueeze(-1)], dim=-1) if self.bias else weight


# Fewest positions per sample at which a convolution's per-sample gradients go through
# a grouped convolution backward rather than patches @ output gradients (measured on
# 2 CPU cores, 128 samples: 2-9x faster at 16 x 16 and above, 1.3x at 8 x 8, 6x slower at 4 x 4).
GROUPED_GRADS_MIN_POSITIONS = 64


def gram(activations: Tensor, operand_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``sum_{n,t} a_nt a_nt^T`` of (n, T, d) activations, (d, d); `operand_dtype` as in :meth:`ConvInput.covariance`."""
    a2 = activations.reshape(-1, activations.shape[-1])
    if operand_dtype is not None:
        a2 = a2.to(operand_dtype)  # once for both operands (they are one tensor)
    return factor_matmul(a2.T, a2, operand_dtype)


class Captured:
    """One batch's capture for each layer: activations (n, T, d_in_total), output gradients (n, T, d_out).

    ``outputs`` are the model's (detached) outputs on the batch. A 2-d
    convolution's activations (its patches) are formed on first access.
    """

    def __init__(self, activations: list, output_grads: list[Tensor], outputs: Tensor) -> None:
        self._activations = list(activations)
        self.output_grads = output_grads
        self.outputs = outputs

    @property
    def activations(self) -> list[Tensor]:
        """Every layer's activations (patches of convolutions formed now, once)."""
        return [self.activation(i) for i in range(len(self._activations))]

    def to(self, dtype: torch.dtype) -> "Captured":
        """The capture with every floating-point tensor in `dtype` (an index layer's ids as they are)."""
        def cast(a):
            if isinstance(a, ConvInput):
                return ConvInput(a.module, a.x.to(dtype), a.bias)
            return a.to(dtype) if a.is_floating_point() else a
        return Captured([cast(a) for a in self._activations], [g.to(dtype) for g in self.output_grads],
                        self.outputs.to(dtype))

    def activation(self, i: int) -> Tensor:
        """Layer i's activations, (n, T, d_in_total) (or (n, T) ids of an index layer)."""
        a = self._activations[i]
        if isinstance(a, ConvInput):
            a = self._activations[i] = a.patches()
        return a

    def activation_covariance(self, i: int, operand_dtype: Optional[torch.dtype] = None) -> Tensor:
        """Layer i's ``sum_{n,t} a_nt a_nt^T`` over the block, (d_in_total, d_in_total); not for index layers.

        `operand_dtype`: 16-bit operands, float32 sums (:meth:`ConvInput.covariance`).
        """
        a = self._activations[i]
        return a.covariance(operand_dtype) if isinstance(a, ConvInput) else gram(a, operand_dtype)

    def layer_grads(self, i: int, start: int, stop: int, output_grads: Optional[Tensor] = None) -> Tensor:
        """Layer i's per-sample gradients ``sum_t g_t a_t^T`` of samples start..stop, (b, d_out, d_in_total).

        Not for index layers. `output_grads` (n, T, d_out) replaces the captured ones
        (e.g. one of fisher="exact"'s K passes).
        """
        g = self.output_grads[i] if output_grads is None else output_grads
        if self.grouped_grads(i):
            return self._activations[i].grads(g, start, stop)
        return g[start:stop].transpose(1, 2) @ self.activation(i)[start:stop]

    def grouped_grads(self, i: int) -> bool:
        """Whether layer i's per-sample gradients come from a grouped convolution backward (a shape rule)."""
        g = self.output_grads[i]
        return (isinstance(self._activations[i], ConvInput) and g.device.type == "cpu"
                and g.shape[-2] >= GROUPED_GRADS_MIN_POSITIONS)

    def per_sample_grads(self, layers: Sequence[Layer], num_params: int, out: Optional[Tensor] = None) -> Tensor:
        """Per-sample gradients of the captured layers as flat vectors, (n, p) (uncaptured entries 0).

        With `out` (n, p), they are written there (no second (n, p) block). Layers
        sharing a weight add their gradients.
        """
        n = self.outputs.shape[0]
        flat = self.output_grads[0].new_zeros(n, num_params) if out is None else out.zero_()
        for i, (layer, g) in enumerate(zip(layers, self.output_grads)):
            if isinstance(self._activations[i], ConvInput):
                layer.add_matrices(self.layer_grads(i, 0, n), flat)
            else:
                layer.add_grads(self.activation(i), g, flat)
        return flat


def capture(functions: ModelFunctions, layers: Sequence[Layer], x: Tensor, y: Optional[Tensor] = None,
            sample_targets: Optional[Callable[[Tensor], Tensor]] = None,
            output_grads: Optional[Callable[[Tensor], Tensor]] = None,
            autocast_dtype: Optional[torch.dtype] = None) -> Captured:
    """One forward and backward over (x, y), recording each layer's inputs and output gradients.

    The gradients are those of each sample's own loss (the batch's mean loss
    times n), so ``sum_t g a^T`` is a per-sample gradient. With
    ``sample_targets``, targets are drawn from the model's outputs instead of
    taken from y (for the true Fisher). With ``output_grads`` (outputs ->
    (K, n, *outputs.shape[1:])), K backward passes start from those output
    gradients instead of the loss's, and each layer's gradients have shape
    (K, n, T, d_out).

    Returns:
        :class:`Captured` with one (n, T, d_in_total) and one (n, T, d_out) tensor per layer
        (an index layer's activations are its (n, T) integer ids; its output gradients
        at ``padding_idx`` positions are 0).

    A layer applied to an input of leading dimension 1 while n > 1 (shared by the
    batch) has its input and output expanded to the n samples (views).

    With ``autocast_dtype`` (16-bit), the forward and backward run under
    ``torch.autocast`` and the captures are widened to the model's dtype. Autocast's
    products differ from plain autograd's by ~1e-2, so layers not yet verified are
    first checked on two samples without it.

    Raises:
        ValueError: a layer applied to an input whose first dimension is neither the
            batch's samples nor 1, or (first capture of these layers only) captured
            gradients of the first sample that differ from autograd's.
    """
    if autocast_dtype is not None:
        if not all(layer.verified for layer in layers) and not _stochastic(functions.model):
            capture(functions, layers, x[:2], None if y is None else y[:2])  # checks them
        with torch.autocast(functions.device.type, dtype=autocast_dtype):
            return capture(functions, layers, x, y, sample_targets, output_grads).to(functions.dtype)
    x = functions.cast_input(x)
    n = x.shape[0]
    records: dict[int, list[tuple[Tensor, Tensor]]] = {id(layer.module): [] for layer in layers}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Optional[Tensor]:
        inp = inputs[0]
        if n > 1 and inp.dim() > 0 and inp.shape[0] == 1 and isinstance(output, Tensor) and output.dim() > 0 \
                and output.shape[0] == 1:
            # An input shared by the batch ((1, T) position ids): the output, expanded to the n
            # samples, is what the rest of the model broadcasts anyway, and its gradient then
            # holds each sample's own g_it instead of their sum.
            inp, output = inp.expand(n, *inp.shape[1:]), output.expand(n, *output.shape[1:])
            records[id(module)].append((inp.detach(), output))
            return output
        records[id(module)].append((inp.detach(), output))
        return None

    handles = [layer.module.register_forward_hook(hook) for layer in layers]
    try:
        with torch.enable_grad():
            theta = functions.theta.detach().requires_grad_(True)
            outputs = functions.outputs(theta, x)
            layer_outputs = [out for layer in layers for _, out in records[id(layer.module)]]
            if output_grads is None:
                targets = sample_targets(outputs.detach()) if sample_targets is not None else y.to(functions.device)
                # The sum of each sample's own loss: its gradient at a sample's positions is
                # that sample's loss gradient, whatever the loss averages over in a batch.
                total = functions.sample_losses(outputs, targets).sum()
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
            if inp.dim() == 0 or inp.shape[0] != n:
                raise ValueError(
                    f"layer {layer.name!r} ({type(layer.module).__name__}) was applied to an input of shape "
                    f"{tuple(inp.shape)}, whose first dimension is not the block's {n} samples, so its per-sample "
                    "gradients cannot be captured; apply it to per-sample inputs, or to an input shared by the "
                    "batch with a leading dimension of 1 (e.g. position ids of shape (1, T)), leave its parameters "
                    "out with params=, or pass fused=False")
            if len(calls) == 1 and layer.rule is _RULES[nn.Conv2d]:
                a = ConvInput(layer.module, inp, layer.bias_slice is not None)
            else:
                a = layer.rule.activations(layer.module, inp)
                if layer.bias_slice is not None:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            a_parts.append(a)
            if output_grads is None:
                g = torch.zeros_like(out) if g is None else g
                g = layer.rule.output_grads(layer.module, g.detach())
            else:
                g = torch.zeros(len(basis), *out.shape, dtype=out.dtype, device=out.device) if g is None else g
                g = torch.stack([layer.rule.output_grads(layer.module, gk.detach()) for gk in g])
            padding = getattr(layer.module, "padding_idx", None) if layer.index else None
            if padding is not None:  # nn.Embedding gives its padding row no gradient
                g = g.masked_fill((a == padding).unsqueeze(-1), 0)
            g_parts.append(g)
        # A layer called several times (shared weights) adds its calls' positions.
        # torch.cat copies even a single part: a layer called once keeps its tensors as they are.
        activations.append(a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1))
        gradients.append(g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts, dim=-2))
    if not all(layer.verified for layer in layers) and not _stochastic(functions.model):
        if output_grads is None:
            first = targets[:1]
            scalar = lambda o: functions.sample_loss(o, first)  # noqa: E731
            first_grads = [g[:1] for g in gradients]
        else:
            direction = basis[0, :1]
            scalar = lambda o: (o * direction).sum()  # noqa: E731
            first_grads = [g[0, :1] for g in gradients]
        # The first sample's patches alone: forming the block's would switch its later
        # products to the patch route, so the first capture would round unlike the others.
        first_activations = [ConvInput(a.module, a.x[:1], a.bias).patches() if isinstance(a, ConvInput) else a[:1]
                             for a in activations]
        _verify_first_sample(functions, layers, x[:1], scalar, first_activations, first_grads)
    return Captured(activations, gradients, outputs.detach())


def _stochastic(model: nn.Module) -> bool:
    return model.training and any(isinstance(m, _STOCHASTIC_MODULES) for m in model.modules())


def _verify_first_sample(functions: ModelFunctions, layers: Sequence[Layer], x1: Tensor,
                         scalar: Callable[[Tensor], Tensor], activations: Sequence[Tensor],
                         output_grads: Sequence[Tensor]) -> None:
    """Checks the captured gradients of the first sample against autograd on that sample alone.

    Capture assumes that each layer's weight acts only through its module's forward,
    on inputs with a batch dimension; a weight also used elsewhere (an output layer
    tied to an embedding through ``h @ embedding.weight.T``), a subclass whose forward
    is not the standard one, or a layer applied to a batch-independent tensor whose
    first dimension happens to equal the batch size would give wrong per-sample
    gradients silently. One single-sample backward, once per set of layers, rules that out.

    Args:
        x1: (1, ...) the first input; scalar: its outputs (1, ...) -> the scalar whose
            gradient was captured; activations, output_grads: its captures, one per layer.
    """
    with torch.enable_grad():
        theta = functions.theta.detach().requires_grad_(True)
        (expected,) = torch.autograd.grad(scalar(functions.outputs(theta, x1)), theta, allow_unused=True)
    expected = torch.zeros_like(theta) if expected is None else expected.detach()
    got = expected.new_zeros(1, expected.numel())
    bounds: dict[tuple[int, int], float] = {}  # per range of the flat vector: tied layers share one
    for layer, a, g in zip(layers, activations, output_grads):
        layer.add_grads(a, g, got)
        for s in layer.columns():
            bounds[s.start, s.stop] = bounds.get((s.start, s.stop), 0.0) + float(layer.term_norms(a, g).sum())
    # Both sides sum the same rank-one terms in other orders (and the batched forward
    # pass rounds differently from the single one): their difference is rounding,
    # bounded by a small multiple of the terms' total size. A missing or spurious
    # contribution is of the order of the gradient itself.
    tol = 1e-6 if functions.dtype == torch.float64 else 1e-2
    bad = []
    for layer in layers:
        for s in layer.columns():
            diff = float((got[0, s] - expected[s]).norm())
            scale = bounds[s.start, s.stop] + float(expected[s].norm())
            if diff > tol * scale:
                bad.append(f"{layer.name!r} (difference {diff:.3g}, gradient norm {float(expected[s].norm()):.3g})")
                break
    if bad:
        raise ValueError(
            f"captured per-sample gradients of layer(s) {', '.join(bad)} differ from autograd on the first sample: "
            "the layer's weight is also used outside its module's forward (e.g. an output layer tied to an "
            "embedding through a functional call such as h @ embedding.weight.T; tie them by sharing the "
            "Parameter between modules instead), the module's forward is not its type's standard one, or the "
            "layer is applied to a tensor without the per-sample batch dimension. Pass fused=False (torch.func "
            "for every parameter) or leave these parameters out with params=")
    for layer in layers:
        layer.verified = True


def _stack_or_none(parts: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    return None if any(p is None for p in parts) else torch.stack(parts)
