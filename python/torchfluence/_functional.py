"""A model and its loss as pure functions of a flat parameter vector (torch.func).

Everything the solvers need: per-sample gradients, batched Hessian- and
Gauss-Newton-vector products, and the mixed second derivatives of the
perturbation mode. Nothing here keeps an autograd graph alive between calls.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]

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
        loss: ``loss(outputs, targets)`` returning the *mean* loss over the batch.
        params: names of the parameters to differentiate (default: all with
            ``requires_grad``).
        dtype: dtype the computations run in (parameters, buffers and floating
            inputs are cast to it); None: the selected parameters' dtype.
    """

    def __init__(self, model: nn.Module, loss: LossFn, params: Optional[Sequence[str]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(outputs, targets), got {type(loss).__name__}")
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
        self.device = devices.pop()
        self.shapes = [named[n].shape for n in names]
        self.sizes = [named[n].numel() for n in names]
        self.num_params = sum(self.sizes)
        self.frozen = {n: t.detach().to(dtype) if t.is_floating_point() else t.detach()
                       for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n not in names}
        self.theta = torch.cat([named[n].detach().reshape(-1).to(dtype) for n in names])
        self.hvp_route = "reverse"  # see hvp

    # -- plumbing -------------------------------------------------------------------------------
    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def cast_input(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    def outputs(self, theta: Tensor, x: Tensor) -> Tensor:
        out = functional_call(self.model, {**self.frozen, **self.unflatten(theta)}, (x,))
        if not isinstance(out, Tensor):
            raise TypeError(f"model must return one Tensor of outputs, got {type(out).__name__}; wrap it so that "
                            "forward returns the tensor the loss takes (e.g. the logits)")
        return out

    def batch_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        value = self.loss(self.outputs(theta, x), y)
        if value.dim() != 0:
            raise ValueError(
                f"loss must return a scalar (the mean over the batch), got shape {tuple(value.shape)}; "
                "use reduction='mean'")
        return value

    def _sample_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.batch_loss(theta, x.unsqueeze(0), y.unsqueeze(0))

    # -- first order ------------------------------------------------------------------------------
    def per_sample_grads(self, x: Tensor, y: Tensor) -> Tensor:
        """Gradients of each sample's loss, (n, p)."""
        x, y = self.cast_input(x), y.to(self.device)
        return vmap(grad(self._sample_loss), in_dims=(None, 0, 0))(self.theta, x, y).detach()

    def check_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Fails early, with a clear message, on a loss that is not the mean of per-sample losses.

        Returns the model's outputs on the first sample of `x`. A loss is a mean
        when two copies of one sample give the same value as the sample alone;
        ``reduction="sum"`` gives twice that, and would scale every influence by n.
        """
        with torch.no_grad():
            x1, y1 = self.cast_input(x[:1]), y[:1].to(self.device)
            out = self.outputs(self.theta, x1)
            one = self.batch_loss(self.theta, x1, y1)
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
        it needs no forward-mode rule of the loss's double backward.
        """
        return self._hvp(self.hvp_route, vectors, self.cast_input(x), y.to(self.device))

    def _hvp(self, route: str, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        gradient = grad(self.batch_loss)
        if route == "forward":
            return vmap(lambda v: jvp(lambda t: gradient(t, x, y), (self.theta,), (v,))[1])(vectors).detach()
        _, pullback = vjp(lambda t: gradient(t, x, y), self.theta)
        return vmap(lambda v: pullback(v)[0])(vectors).detach()

    def ggn_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Generalised Gauss-Newton J^T H_out J times each row of `vectors` (k, p) -> (k, p)."""
        x, y = self.cast_input(x), y.to(self.device)
        out, pullback = vjp(lambda t: self.outputs(t, x), self.theta)
        out = out.detach()
        loss_grad = grad(lambda o: self.loss(o, y))
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

        return vmap(one)(x).detach()

    def output_loss_hessians(self, x: Tensor, y: Tensor) -> Tensor:
        """Hessian of each sample's own loss w.r.t. its flattened outputs, (n, c, c)."""
        x, y = self.cast_input(x), y.to(self.device)
        with torch.no_grad():
            out = self.outputs(self.theta, x)
        shape = out.shape[1:]

        def one(o: Tensor, t: Tensor) -> Tensor:
            return torch.func.hessian(lambda v: self.loss(v.view(1, *shape), t.unsqueeze(0)))(o.reshape(-1))

        return vmap(one)(out, y).detach()

    # -- perturbation mode ------------------------------------------------------------------------
    def perturbation_scores(self, factors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """d/dx_j [grad_theta L(z_j) . f_i] for every factor f_i and sample j, (n_f, n, *x.shape[1:])."""
        x, y = self.cast_input(x), y.to(self.device)

        def one(xj: Tensor, yj: Tensor) -> Tensor:
            def projected(xv: Tensor) -> Tensor:
                return grad(self._sample_loss)(self.theta, xv, yj) @ factors.T  # (n_f,)

            return jacrev(projected)(xj)  # (n_f, *x_shape)

        return vmap(one, out_dims=1)(x, y).detach()
