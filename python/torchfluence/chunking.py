"""How many samples and vectors one vmapped curvature product takes at a time.

A batched Hessian-vector product of k vectors over b samples runs the
double backward on tensors of k x b x (a sample's intermediate values): on a
CPU these are elementwise, memory-bound passes, so their speed depends on
whether those tensors stay in cache. Measured on 2 cores (digits CNN, 690
parameters, 1437 samples, explicit H): 512 vectors x 256 samples per call took
5.6 s, 64 x 256 took 2.6 s, for the same arithmetic.

The chunk sizes follow from the shapes alone (never from timing), so a run
gives the same bits in every process. On a GPU, whose throughput wants large
calls and whose memory is the limit, the whole product is one call, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .budget import vmap_call_elements

# Fewest vectors per call before the samples are split instead: below this the
# per-call overhead of the double backward (tens of ms) is no longer amortised.
MIN_VECTORS = 64


@dataclass(frozen=True)
class Chunks:
    """One product's split: `samples` samples and `vectors` vectors per vmapped call."""

    samples: int
    vectors: int


def plan(num_vectors: int, num_samples: int, per_sample: int, num_params: int, device: torch.device,
         budget: int | None = None) -> Chunks:
    """The chunk sizes for `num_vectors` products over `num_samples` samples.

    Args:
        per_sample: elements of one sample's intermediate values (see :func:`footprint`).
        num_params: p; each vector adds a few p-sized tensors to a call.
        device: a CUDA device takes everything in one call.
        budget: elements per call on a CPU; None: :func:`torchfluence.budget.vmap_call_elements`.
    """
    budget = vmap_call_elements(device) if budget is None else budget
    k, b = max(num_vectors, 1), max(num_samples, 1)
    if device.type != "cpu":
        return Chunks(b, k)
    per_sample = max(per_sample, 1)
    want = min(k, MIN_VECTORS)
    samples = b
    if want * (b * per_sample + num_params) > budget:
        samples = max(1, (budget // want - num_params) // per_sample)
        samples = _even(b, min(samples, b))
    vectors = max(1, budget // (samples * per_sample + num_params))
    return Chunks(samples, _even(k, min(vectors, k)))


def _even(total: int, most: int) -> int:
    """The chunk size that splits `total` into as few near-equal pieces of at most `most` as possible."""
    pieces = math.ceil(total / most)
    return math.ceil(total / pieces)


def footprint(model: nn.Module, call, x: Tensor) -> int:
    """Elements of the intermediate values of one sample: the outputs of every leaf module, plus the input.

    Counted on a forward of the first two samples of `x` (two, so that a model
    left in training mode with batch norm runs), divided by their number.

    Args:
        model: the network, whose leaf modules are hooked for the one call.
        call: ``x -> outputs``, running `model` on a batch.
        x: (b, ...) a batch of inputs.

    Returns:
        The count, or 0 when that forward fails (the product then runs unchunked,
        and the product's own forward reports the model's error).
    """
    sample = x[:2]
    total = [sample.numel()]

    def hook(module: nn.Module, inputs: tuple, output) -> None:
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, Tensor):
                total[0] += t.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            call(sample)
    except Exception:  # only an estimate: the real forward follows and raises on its own
        return 0
    finally:
        for h in handles:
            h.remove()
    return total[0] // max(sample.shape[0], 1)
