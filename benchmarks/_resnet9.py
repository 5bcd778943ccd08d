"""The ResNet-9 workload of the EK-FAC benchmarks: model, synthetic CIFAR-shaped data, kronfluence runs.

- :func:`resnet9`: the DAWNBench ResNet-9 layout at a chosen base width (64 is the
  original, ~6.5M parameters).
- :func:`cifar_like`: pure-noise inputs with random labels (no structure to learn).
- :func:`synthetic_cifar`: learnable data, generated on the target device: each
  class has a smooth 3 x 32 x 32 pattern; a sample is its class's pattern at a
  random contrast, shifted by a few pixels, plus unit Gaussian noise, and a small
  fraction of the labels is replaced by random ones.
- :func:`trained_resnet9` / :func:`train_epochs` / :func:`freeze_batchnorm`: a model
  with structure whose conv and linear weights are the scored parameters.
- :func:`kronfluence_task`, :class:`KronfluenceRun`, :func:`kronfluence_pairwise`: kronfluence
  1.0.1's documented classification task, one analysis, and one timed fit + pairwise-scores run.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

CLASSES = 10


# -- model ------------------------------------------------------------------------------------------


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> list[nn.Module]:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return layers + [nn.MaxPool2d(2)] if pool else layers


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(*conv_bn(channels, channels), *conv_bn(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)


def resnet9(width: int) -> nn.Sequential:
    """The DAWNBench ResNet-9 layout at base width `width` (64 in the original): ~1602 width^2 parameters."""
    w = width
    return nn.Sequential(
        *conv_bn(3, w),
        *conv_bn(w, 2 * w, pool=True),
        Residual(2 * w),
        *conv_bn(2 * w, 4 * w, pool=True),
        *conv_bn(4 * w, 8 * w, pool=True),
        Residual(8 * w),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, CLASSES),
    )


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Eval mode with BatchNorm's affine parameters frozen: the conv and linear weights are the
    parameters both libraries score (kronfluence tracks only Linear and Conv2d modules)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)
    return model


def trained_resnet9(width: int, x: Tensor, y: Tensor, steps: int = 20) -> nn.Module:
    """A few Adam steps (BatchNorm in training mode, so its running statistics move), then
    :func:`freeze_batchnorm`."""
    torch.manual_seed(0)
    model = resnet9(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    return freeze_batchnorm(model)


def train_epochs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 1,
    batch: int = 512,
    lr: float = 0.1,
    seed: int = 0,
    sync: Callable[[], None] = lambda: None,
) -> float:
    """Trains `model` in place (BatchNorm in training mode) and returns the wall time in seconds.

    SGD with Nesterov momentum 0.9 and weight decay 5e-4, batch `batch`, the
    learning rate rising linearly to `lr` over the first fifth of the steps and
    falling linearly to zero after; the data is reshuffled every epoch (on its device).
    `sync` is called before each clock reading (``torch.cuda.synchronize`` on a GPU).
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * -(-len(x) // batch)
    peak = max(1, steps // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / peak if s < peak else max(0.0, (steps - s) / max(1, steps - peak))
    )
    g = torch.Generator(device=x.device).manual_seed(seed)
    sync()
    began = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g, device=x.device)
        for start in range(0, len(x), batch):
            rows = order[start : start + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
            schedule.step()
    sync()
    return time.perf_counter() - began


# -- data -------------------------------------------------------------------------------------------


def cifar_like(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Pure-noise CIFAR-shaped inputs with random labels (on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def class_patterns(device: torch.device, seed: int = 0) -> Tensor:
    """(CLASSES, 3, 32, 32) smooth patterns of unit RMS: 4 x 4 random fields upsampled bilinearly."""
    g = torch.Generator(device=device).manual_seed(seed)
    coarse = torch.randn(CLASSES, 3, 4, 4, generator=g, device=device)
    fine = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return fine / fine.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()


def synthetic_cifar(
    n: int,
    seed: int,
    device: torch.device,
    *,
    signal: float = 0.5,
    max_shift: int = 4,
    label_noise: float = 0.05,
    pattern_seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """`n` learnable CIFAR-shaped samples on `device`: (x (n, 3, 32, 32) float32, y (n,) int64).

    x = c * signal * roll(pattern[y], shift) + N(0, 1), with the contrast c uniform in
    [0.5, 1.5] and a shift of up to `max_shift` pixels in each direction; then a
    fraction `label_noise` of the labels is redrawn at random. Sets drawn with
    different `seed` and the same `pattern_seed` come from the same distribution.
    """
    patterns = class_patterns(device, pattern_seed)
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g, device=device)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g, device=device)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g, device=device)
    # One roll per shift pair would be a Python loop over samples; shift through index arithmetic instead.
    rows = (torch.arange(32, device=device).view(1, 32) - shifts[:, :1]) % 32  # (n, 32)
    cols = (torch.arange(32, device=device).view(1, 32) - shifts[:, 1:]) % 32
    base = patterns[y]  # (n, 3, 32, 32)
    base = base.gather(2, rows.view(n, 1, 32, 1).expand(n, 3, 32, 32))
    base = base.gather(3, cols.view(n, 1, 1, 32).expand(n, 3, 32, 32))
    x = signal * contrast * base + torch.randn(n, 3, 32, 32, generator=g, device=device)
    flip = torch.rand(n, generator=g, device=device) < label_noise
    y = torch.where(flip, torch.randint(0, CLASSES, (n,), generator=g, device=device), y)
    return x, y


# -- kronfluence ------------------------------------------------------------------------------------


def kronfluence_task():
    from kronfluence.task import Task

    class Classification(Task):
        """kronfluence's documented classification task: summed losses (per-sample gradients), labels
        sampled from the model's predictive distribution for the true Fisher, loss as measurement."""

        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(
                        torch.softmax(logits.detach(), dim=-1), num_samples=1
                    ).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    return Classification()


class KronfluenceRun:
    """One kronfluence analysis in a temporary directory: :meth:`fit` the factors, then :meth:`scores`.

    `model` is copied (``prepare_model`` wraps modules in place). kronfluence
    always writes factors and scores to disk; :meth:`scores` reads the matrix back.
    Use as a context manager (the directory is removed on exit).
    """

    def __init__(
        self,
        model: nn.Module,
        train: tuple[Tensor, Tensor],
        queries: tuple[Tensor, Tensor],
        *,
        cpu: bool,
        factor_args=None,
        score_args=None,
        out_dir: str | None = None,
        task=None,
    ) -> None:
        from kronfluence.analyzer import prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        self.factor_args = FactorArguments() if factor_args is None else factor_args
        self.score_args = ScoreArguments() if score_args is None else score_args
        self.task = kronfluence_task() if task is None else task  # a kronfluence Task; default: classification
        self.model = prepare_model(copy.deepcopy(model), self.task)
        self.train, self.queries = TensorDataset(*train), TensorDataset(*queries)
        self.cpu = cpu
        self._tmp = tempfile.TemporaryDirectory(dir=out_dir)
        self.analyzer = None
        self.factors_name = ""
        self._fits = self._scores = 0

    def __enter__(self) -> KronfluenceRun:
        return self

    def __exit__(self, *exc) -> None:
        self.analyzer = None
        self._tmp.cleanup()

    def fit(self, batch: int) -> None:
        """``Analyzer(...)`` and ``fit_all_factors`` (covariances, eigendecomposition, lambdas).

        Each call fits under a new name, so a failed call leaves nothing that a later
        one would load instead of computing.
        """
        from kronfluence.analyzer import Analyzer

        self._fits += 1
        self.factors_name = f"factors{self._fits}"
        self.analyzer = Analyzer(
            "bench",
            self.model,
            self.task,
            cpu=self.cpu,
            disable_tqdm=True,
            output_dir=self._tmp.name,
            log_level=logging.WARNING,
        )
        self.analyzer.fit_all_factors(
            self.factors_name, self.train, per_device_batch_size=batch, factor_args=self.factor_args
        )

    def scores(self, query_batch: int, train_batch: int) -> Tensor:
        """``compute_pairwise_scores`` and the matrix read back: (n_queries, n_train) on the CPU, in
        kronfluence's score dtype. Each call writes under a new name, as :meth:`fit` does."""
        self._scores += 1
        name = f"scores{self._scores}"
        self.analyzer.compute_pairwise_scores(
            name,
            self.factors_name,
            self.queries,
            self.train,
            per_device_query_batch_size=query_batch,
            per_device_train_batch_size=train_batch,
            score_args=self.score_args,
        )
        return self.analyzer.load_pairwise_scores(name)["all_modules"]


def kronfluence_pairwise(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    queries: tuple[Tensor, Tensor],
    *,
    cpu: bool,
    factor_batch: int,
    query_batch: int,
    train_batch: int,
    factor_args=None,
    score_args=None,
    sync: Callable[[], None] = lambda: None,
    task=None,
) -> tuple[dict[str, float], Tensor]:
    """One :class:`KronfluenceRun`, fit and scores timed separately (`sync` before each clock reading).

    Returns ({"fit": s, "scores": s}, the (n_queries, n_train) scores as kronfluence returns them).
    """
    with KronfluenceRun(
        model, train, queries, cpu=cpu, factor_args=factor_args, score_args=score_args, task=task
    ) as run:
        sync()
        began = time.perf_counter()
        run.fit(factor_batch)
        sync()
        fitted = time.perf_counter()
        scores = run.scores(query_batch, train_batch)
        sync()
        done = time.perf_counter()
    return {"fit": fitted - began, "scores": done - fitted}, scores
