"""A model and its loss as pure functions of a flat parameter vector (torch.func).

Everything the solvers need: per-sample gradients, batched Hessian- and
Gauss-Newton-vector products, and the mixed second derivatives of the
perturbation mode. Nothing here keeps an autograd graph alive between calls.

The training objective is the mean of per-sample losses, ``(1/n) sum_i L_i``,
where ``L_i = loss(outputs[i:i+1], targets[i:i+1])`` is the loss of sample i on
its own (a batch of one). Per-sample gradients, curvature and captured layer
gradients all use this one definition. For a loss that is the batch mean of
per-sample losses (``reduction="mean"`` over the samples) it is the loss itself.
For per-token losses of sequences it is the mean over sequences of each
sequence's own loss: ``F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
ignore_index=-100)`` averages over all unmasked tokens of a batch, and here each
sequence's loss is the mean over its own unmasked tokens (every sequence counts
once, whatever its length).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from .chunking import footprint, plan
from .data import Batch

LossFn = Callable[[Tensor, Tensor], Tensor]
OutputTransform = Callable[[Any], Tensor]


def default_output_transform(output: Any) -> Tensor:
    """The tensor the loss takes from a model's raw output.

    - a Tensor: itself;
    - a dict or other Mapping (a Hugging Face ``ModelOutput`` is an ``OrderedDict``):
      its ``"logits"`` entry;
    - a tuple or list: its first element (the logits of ``return_dict=False`` models);
    - another object with a ``logits`` attribute (a dataclass): that attribute.

    Args:
        output: what ``model(x)`` returned.

    Returns:
        (n, ...) the outputs the loss takes.

    Raises:
        TypeError: for any other output, telling to pass ``output_transform=``.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" not in output:
            raise TypeError(f"model returned a {type(output).__name__} with keys {list(output)[:8]} and no "
                            "'logits'; pass output_transform= a callable raw_output -> Tensor that picks the "
                            "tensor the loss takes (e.g. output_transform=lambda out: out['scores'])")
        value, where = output["logits"], f"the 'logits' entry of the {type(output).__name__}"
    elif isinstance(output, (tuple, list)):
        if not output:
            raise TypeError(f"model returned an empty {type(output).__name__}; it must return the outputs the "
                            "loss takes (or pass output_transform=)")
        value, where = output[0], f"element 0 of the {type(output).__name__}"
    elif isinstance(getattr(output, "logits", None), Tensor):
        value, where = output.logits, f"the .logits of the {type(output).__name__}"
    else:
        raise TypeError(f"model must return a Tensor of outputs (or a tuple, dict or ModelOutput holding the "
                        f"logits), got {type(output).__name__}; pass output_transform= a callable "
                        "raw_output -> Tensor that picks the tensor the loss takes")
    if not isinstance(value, Tensor):
        raise TypeError(f"model output: {where} is a {type(value).__name__}, not a Tensor; pass "
                        "output_transform= a callable raw_output -> Tensor that picks the tensor the loss takes")
    return value

def second_derivatives() -> contextlib.AbstractContextManager:
    """Runs ``scaled_dot_product_attention`` on its math backend, whose backward is differentiable.

    The fused CPU and GPU attention kernels have no derivative of their backward, so
    Hessian- and Gauss-Newton-vector products through attention (Hugging Face models
    call ``F.scaled_dot_product_attention``) need the math route. Models without
    attention run the same operations either way: their results do not change.
    Per-sample gradients by ``vmap`` use it too (the fused kernels have no batching
    rule, and run there one sample at a time); the captured first-order passes keep
    the fused kernels.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the context manager of that time
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)
    return sdpa_kernel(SDPBackend.MATH)


_STOCHASTIC_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                       nn.modules.batchnorm._BatchNorm)


def resolve_dtype(dtype: Optional[torch.dtype], params: Sequence[Tensor]) -> torch.dtype:
    """The computation dtype: `dtype`, or the parameters' own; float32 or float64 only."""
    if dtype is None:
        dtypes = {p.dtype for p in params}
        if dtypes - {torch.float32, torch.float64}:
            raise ValueError(f"dtype: the model's parameters are {sorted(map(str, dtypes))}, and influences need "
                             "float32 or float64 arithmetic; pass dtype=torch.float32 (the parameters are cast "
                             "for the computation, the model is left as it is)")
        return torch.float64 if dtypes == {torch.float64} else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32, torch.float64 or None (the model's), got {dtype}")
    return dtype


class ModelFunctions:
    """Functional view of ``model`` + ``loss`` over the selected parameters.

    Args:
        model: the network; its trainable parameters are read at construction.
            Inputs of integer dtype (token ids) reach it as they are; floating
            inputs are cast to `dtype`.
        loss: ``loss(outputs, targets)`` returning the *mean* loss over the batch;
            each sample's loss is ``loss`` on that sample alone (see the module's
            docstring for per-token losses of sequences).
        params: names of the parameters to differentiate (default: all with
            ``requires_grad``).
        dtype: dtype the computations run in (parameters, buffers and floating
            inputs are cast to it); None: the selected parameters' dtype.
        output_transform: ``raw_output -> Tensor``, applied to what the model
            returns before the loss sees it (and wherever outputs are used);
            None: :func:`default_output_transform` (a tensor as is, a tuple's first
            element, a dict's or ``ModelOutput``'s ``"logits"``).
    """

    def __init__(self, model: nn.Module, loss: LossFn, params: Optional[Sequence[str]] = None,
                 dtype: Optional[torch.dtype] = None, output_transform: Optional[OutputTransform] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(outputs, targets), got {type(loss).__name__}")
        if output_transform is not None and not callable(output_transform):
            raise TypeError(f"output_transform must be a callable raw_output -> Tensor or None, got "
                            f"{type(output_transform).__name__}")
        sparse = [name for name, m in model.named_modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
        if sparse:
            raise ValueError(f"model: embeddings {sparse} have sparse=True, whose sparse gradients torch.func "
                             "cannot differentiate per sample; set their .sparse = False for the influence "
                             "computation (it changes only the format of the gradient)")
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            unknown = [n for n in params if n not in named]
            if unknown:
                raise ValueError(f"params: unknown parameter names {unknown}; the model has {list(named)}")
            names = list(params)
        if not names:
            raise ValueError("the model has no trainable parameters (none with requires_grad, or params=[])")
        if model.training and any(isinstance(m, _STOCHASTIC_MODULES) for m in model.modules()):
            warnings.warn(
                "the model is in training mode and has dropout or batch-norm layers, so influences are "
                "random or batch-dependent; call model.eval() first", stacklevel=3)
        dtype = resolve_dtype(dtype, [named[n] for n in names])
        devices = {named[n].device for n in names}
        if len(devices) > 1:
            raise ValueError(f"model: the selected parameters must be on one device, got {sorted(map(str, devices))}")
        self.model, self.loss, self.names, self.dtype = model, loss, names, dtype
        self.output_transform: OutputTransform = (default_output_transform if output_transform is None
                                                  else output_transform)
        self.device = devices.pop()
        self.shapes = [named[n].shape for n in names]
        self.sizes = [named[n].numel() for n in names]
        self.num_params = sum(self.sizes)
        self.frozen = {n: t.detach().to(dtype) if t.is_floating_point() else t.detach()
                       for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n not in names}
        self.theta = torch.cat([named[n].detach().reshape(-1).to(dtype) for n in names])
        self.hvp_route = "reverse"  # see hvp
        self.loss_style: Optional[str] = None  # with Batch targets: "targets" or "batch" (see sample_loss)
        self.loop_samples = False  # per-sample gradients one sample at a time (see per_sample_grads)
        self._footprints: dict = {}  # input shape -> elements of a sample's intermediate values

    # -- plumbing -------------------------------------------------------------------------------
    def subset(self, names: Sequence[str]) -> "ModelFunctions":
        """The same model, loss, dtype and output transform over the parameters `names`."""
        functions = ModelFunctions(self.model, self.loss, names, self.dtype, self.output_transform)
        functions.loss_style, functions.loop_samples = self.loss_style, self.loop_samples
        return functions

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def cast_input(self, x: Tensor) -> Tensor:
        """`x` on the device; floating inputs in the computation dtype, integer ones (token ids) as they are.

        A :class:`~torchfluence.data.Batch` has each of its tensors cast so.
        """
        if isinstance(x, Batch):
            return x.map(self.cast_input)
        x = x.to(self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    def outputs(self, theta: Tensor, x: Tensor) -> Tensor:
        """The model's outputs at parameters `theta` (p,) for inputs (b, ...), after the output transform.

        A :class:`~torchfluence.data.Batch` of inputs is passed as keyword (a dict's) or
        positional (a tuple's) arguments.
        """
        params = {**self.frozen, **self.unflatten(theta)}
        if isinstance(x, Batch):
            try:
                raw = x.call(lambda *args, **kwargs: functional_call(self.model, params, args, kwargs))
            except TypeError as error:  # the arguments do not fit the model's forward
                how = (f"a dict batch's entries {list(x.parts)} as keyword arguments (its 'labels' held back as "
                       "the targets)" if x.keyword else f"a tuple batch's first {len(x.parts)} elements as "
                       "positional arguments (its last held back as the targets)")
                raise TypeError(f"the model was called with {how} and failed: {error}. Batches of (inputs, "
                                "targets) pairs, dicts of the model's keyword inputs plus 'labels', and tuples of "
                                "positional inputs plus targets are taken") from error
            self._raw_type = type(raw)
        else:
            raw = functional_call(self.model, params, (x,))
        out = self.output_transform(raw)
        if not isinstance(out, Tensor):
            raise TypeError(f"output_transform must return a Tensor (the outputs the loss takes), got "
                            f"{type(out).__name__}")
        return out

    def sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss of one sample, from its (1, ...) outputs and (1, ...) targets; a scalar.

        With a :class:`~torchfluence.data.Batch` of targets (dict or tuple batches) the
        loss is called in one of two styles, found on the first call that succeeds:
        ``loss(logits, targets)`` with the batch's ``"labels"`` (a tuple's last element),
        else ``loss(output, batch)`` with the model's output rebuilt around the logits
        (a ``ModelOutput`` of the model's own type, a tuple, or the tensor) and the batch
        as the data gave it (a dict or a tuple), as kronfluence's task receives them.
        """
        if isinstance(targets, Batch):
            return self._batch_loss_value(outputs, targets)
        value = self.loss(outputs, targets)
        if not isinstance(value, Tensor) or value.dim() != 0:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"loss must return a scalar (the mean over the batch), got {got}; use reduction='mean'")
        return value

    def _batch_loss_value(self, outputs: Tensor, batch: Batch) -> Tensor:
        """The loss on a Batch of targets, in the style found on the first call (see :meth:`sample_loss`)."""
        styles = [self.loss_style] if self.loss_style is not None else ["targets", "batch"]
        errors = []
        for style in styles:
            try:
                if style == "targets":
                    value = self.loss(outputs, batch.targets())
                else:
                    value = self.loss(self._rebuilt_output(outputs), batch.parts)
                if not isinstance(value, Tensor) or value.dim() != 0:
                    got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"loss must return a scalar (the mean over the batch), got {got}; use "
                                     "reduction='mean'")
            except Exception as error:  # noqa: BLE001 - reported below with the style tried
                errors.append((style, error))
                continue
            self.loss_style = style
            return value
        said = {"targets": "loss(logits, targets) with the batch's 'labels' (a tuple's last element) as targets",
                "batch": "loss(output, batch) with the model's output and the batch as given"}
        detail = "; ".join(f"as {said[style]}: {type(e).__name__}: {e}" for style, e in errors)
        kind = "dict" if batch.keyword else "tuple"
        raise TypeError(f"loss failed on a {kind} batch {batch.describe()}, called {detail}") from errors[-1][1]

    def _rebuilt_output(self, outputs: Tensor) -> Any:
        """The model's output as its own type around `outputs` (the tensor the output transform took)."""
        kind = getattr(self, "_raw_type", Tensor)
        if kind is tuple or kind is list:
            return kind([outputs])
        if isinstance(kind, type) and issubclass(kind, Mapping):
            try:
                return kind(logits=outputs)  # a ModelOutput: other fields None
            except TypeError:
                return {"logits": outputs}
        return outputs

    def sample_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Each sample's own loss, (b,), from outputs (b, ...) and targets (b, ...).

        The loss runs on each sample as a batch of one (under ``vmap``), so a loss
        that averages over all tokens of a batch gives each sequence's own mean.
        """
        return vmap(lambda o, t: self.sample_loss(o.unsqueeze(0), t.unsqueeze(0)))(outputs, targets)

    def mean_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The objective on a batch: the mean of :meth:`sample_losses`."""
        return self.sample_losses(outputs, targets).mean()

    def batch_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.mean_loss(self.outputs(theta, x), y)

    def _sample_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.sample_loss(self.outputs(theta, x.unsqueeze(0)), y.unsqueeze(0))

    # -- first order ------------------------------------------------------------------------------
    def per_sample_grads(self, x: Tensor, y: Tensor) -> Tensor:
        """Gradients of each sample's loss, (n, p)."""
        x, y = self.cast_input(x), y.to(self.device)
        if not self.loop_samples:
            try:
                # The fused attention kernels have no batching rule: under vmap they run sample by sample.
                with second_derivatives():
                    return vmap(grad(self._sample_loss), in_dims=(None, 0, 0))(self.theta, x, y).detach()
            except RuntimeError as error:
                if "data-dependent control flow" not in str(error):
                    raise
                # The model branches on its inputs' values (Hugging Face's attention masks check
                # whether any position is padded), which vmap cannot: one grad per sample instead.
                self.loop_samples = True
        gradient = grad(lambda t, xi, yi: self.sample_loss(self.outputs(t, xi), yi))
        return torch.stack([gradient(self.theta, x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]).detach()

    def check_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Fails early, with a clear message, on a loss that is not the mean of per-sample losses.

        Returns the model's outputs on the first sample of `x`. A loss is a mean
        when two copies of one sample give the same value as the sample alone;
        ``reduction="sum"`` gives twice that, and would scale every influence by n.
        """
        with torch.no_grad():
            x1, y1 = self.cast_input(x[:1]), y[:1].to(self.device)
            out = self.outputs(self.theta, x1)
            one = self.sample_loss(out, y1)
            if isinstance(y1, Batch):
                two = self.sample_loss(torch.cat([out, out]), y1.map(lambda t: torch.cat([t, t])))
            else:
                two = self.loss(torch.cat([out, out]), torch.cat([y1, y1]))
        if not bool(torch.isfinite(one)):
            raise ValueError(f"loss: the loss of the first sample is {float(one)}; check the model and the targets")
        if not torch.allclose(two, one, rtol=1e-4, atol=1e-12 * float(one.abs()) + 1e-30):
            raise ValueError(f"loss must return the mean over the batch (reduction='mean'): two copies of one "
                             f"sample give {float(two):.6g}, the sample alone {float(one):.6g}")
        return out

    # -- second order -----------------------------------------------------------------------------
    def hvp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Hessian of the batch's mean loss times each row of `vectors` (k, p) -> (k, p).

        Reverse-over-reverse: one backward pass builds the gradient's graph, and a
        vmapped vjp of the gradient gives H v for every vector (H is symmetric).
        The route is fixed, never chosen by timing, so results are the same bits in
        every process; measured on the CPU it is also the faster one (1.3-1.6x over
        forward-over-reverse on the digits MLP and CNN at 10 and 360 vectors), and
        it needs no forward-mode rule of the loss's double backward. Samples and
        vectors go through in chunks sized by :mod:`torchfluence.chunking`.
        """
        return self.hessian_operator(x, y, vectors.shape[0])(vectors)

    def hessian_operator(self, x: Tensor, y: Tensor, num_vectors: int) -> Callable[[Tensor], Tensor]:
        """``vectors (k, p) -> H_batch vectors`` for the batch (x, y), reusable for many calls.

        Each sample chunk's forward pass and gradient graph are built once and kept
        (reverse route), so every call runs only the vmapped double backward.
        `num_vectors` is the k the chunks are planned for.
        """
        x, y = self.cast_input(x), y.to(self.device)
        b = x.shape[0]
        chunks = plan(num_vectors, b, self._footprint(x), self.num_params, self.device)
        gradient = grad(self.batch_loss)
        parts = []
        with second_derivatives():
            self._build_products(x, y, b, chunks, gradient, parts)

        def apply(vectors: Tensor) -> Tensor:
            with second_derivatives():
                return self._apply_products(vectors, chunks, parts)

        return apply

    def _build_products(self, x: Tensor, y: Tensor, b: int, chunks, gradient: Callable, parts: list) -> None:
        """Appends (weight, vmapped H_chunk v) for each sample chunk of (x, y) to `parts`."""
        for start in range(0, b, chunks.samples):
            xs, ys = x[start:start + chunks.samples], y[start:start + chunks.samples]
            weight = xs.shape[0] / b
            if self.hvp_route == "forward":
                def product(v: Tensor, xs=xs, ys=ys) -> Tensor:
                    return jvp(lambda t: gradient(t, xs, ys), (self.theta,), (v,))[1]
            else:
                _, pullback = vjp(lambda t, xs=xs, ys=ys: gradient(t, xs, ys), self.theta)

                def product(v: Tensor, pullback=pullback) -> Tensor:
                    return pullback(v)[0]
            parts.append((weight, vmap(product)))

    @staticmethod
    def _apply_products(vectors: Tensor, chunks, parts: list) -> Tensor:
        """The weighted sum over sample chunks of H_chunk v for each row of `vectors`, in vector chunks."""
        out = torch.empty_like(vectors)
        for start in range(0, vectors.shape[0], chunks.vectors):
            rows = vectors[start:start + chunks.vectors]
            total = None
            for weight, product in parts:
                part = product(rows).detach()
                if weight != 1:
                    part.mul_(weight)
                total = part if total is None else total.add_(part)
            out[start:start + rows.shape[0]] = total
        return out

    def _footprint(self, x: Tensor) -> int:
        """Elements of one sample's intermediate values for inputs shaped like `x` (cached per shape)."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._footprints:
            self._footprints[key] = footprint(self.model, lambda x1: self.outputs(self.theta, x1), x)
        return self._footprints[key]

    def ggn_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Generalised Gauss-Newton J^T H_out J times each row of `vectors` (k, p) -> (k, p)."""
        with second_derivatives():
            return self._ggn_vp(vectors, x, y)

    def _ggn_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        x, y = self.cast_input(x), y.to(self.device)
        out, pullback = vjp(lambda t: self.outputs(t, x), self.theta)
        out = out.detach()
        loss_grad = grad(lambda o: self.mean_loss(o, y))
        _, loss_hessian_pullback = vjp(loss_grad, out)  # H_out is symmetric: its VJP is H_out v

        def one(v: Tensor) -> Tensor:
            jv = jvp(lambda t: self.outputs(t, x), (self.theta,), (v,))[1]
            return pullback(loss_hessian_pullback(jv)[0])[0]

        return vmap(one)(vectors).detach()

    def output_jacobians(self, x: Tensor) -> Tensor:
        """Per-sample Jacobians of the flattened outputs, (n, c, p)."""
        x = self.cast_input(x)

        def one(xi: Tensor) -> Tensor:
            return jacrev(lambda t: self.outputs(t, xi.unsqueeze(0)).reshape(-1))(self.theta)

        with second_derivatives():
            return vmap(one)(x).detach()

    def output_loss_hessians(self, x: Tensor, y: Tensor) -> Tensor:
        """Hessian of each sample's own loss w.r.t. its flattened outputs, (n, c, c)."""
        x, y = self.cast_input(x), y.to(self.device)
        with torch.no_grad():
            out = self.outputs(self.theta, x)
        shape = out.shape[1:]

        def one(o: Tensor, t: Tensor) -> Tensor:
            return torch.func.hessian(lambda v: self.sample_loss(v.view(1, *shape), t.unsqueeze(0)))(o.reshape(-1))

        return vmap(one)(out, y).detach()

    # -- perturbation mode ------------------------------------------------------------------------
    def perturbation_scores(self, factors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """d/dx_j [grad_theta L(z_j) . f_i] for every factor f_i and sample j, (n_f, n, *x.shape[1:]).

        Needs floating inputs: integer inputs (token ids) have no derivative.
        """
        if not x.is_floating_point():
            raise TypeError(f"mode='perturbation' differentiates the influence with respect to the inputs, so x "
                            f"must be floating point, got {x.dtype} of shape {tuple(x.shape)} (token ids have no "
                            "derivative); use mode='up'")
        x, y = self.cast_input(x), y.to(self.device)

        def one(xj: Tensor, yj: Tensor) -> Tensor:
            def projected(xv: Tensor) -> Tensor:
                return grad(self._sample_loss)(self.theta, xv, yj) @ factors.T  # (n_f,)

            return jacrev(projected)(xj)  # (n_f, *x_shape)

        with second_derivatives():
            return vmap(one, out_dims=1)(x, y).detach()
