"""Small models on scikit-learn's digits and the exact float64 influence oracle."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, TensorDataset


def digits(n_train: int = 300, n_test: int = 40, dtype=torch.float64, image: bool = False, seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    if image:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[n_train:n_train + n_test]
    return x[train], y[train], x[test], y[test]


def mlp(dtype=torch.float64, hidden: int = 12, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype).eval()


def cnn(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10)).to(dtype).eval()


def loader(x, y, batch_size: int = 128) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def flat_params(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    return names, torch.cat([params[n].detach().reshape(-1) for n in names])


def _unflatten(model, names, flat):
    params = dict(model.named_parameters())
    out, start = {}, 0
    for n in names:
        size = params[n].numel()
        out[n] = flat[start:start + size].view_as(params[n])
        start += size
    return out


def exact_hessian(model, loss, x, y) -> torch.Tensor:
    """Hessian of the mean loss over all of (x, y), (p, p) float64, by torch.func.hessian."""
    names, theta = flat_params(model)
    theta = theta.double()
    model64 = model.double()

    def total(t):
        return loss(functional_call(model64, _unflatten(model64, names, t), (x.double(),)), y)

    return hessian(total)(theta)


def loop_grads(model, loss, x, y) -> torch.Tensor:
    """Per-sample gradients by plain autograd, one sample at a time, (n, p)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        value = loss(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows).detach()


def exact_influences(model, loss, reg, x_train, y_train, x_test, y_test, x=None, y=None, curvature=None):
    """grad_test (H + reg I)^-1 grad_train^T by a dense float64 solve, (n_test, n)."""
    x = x_train if x is None else x
    y = y_train if y is None else y
    h = exact_hessian(model, loss, x_train, y_train) if curvature is None else curvature
    g_test = loop_grads(model, loss, x_test, y_test).double()
    g = loop_grads(model, loss, x, y).double()
    factors = torch.linalg.solve(h + reg * torch.eye(h.shape[0], dtype=h.dtype), g_test.T).T
    return factors @ g.T


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def train(model: nn.Module, x, y, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3) -> nn.Module:
    """Full-batch Adam to near a minimum, so the Hessian is close to positive definite."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()
