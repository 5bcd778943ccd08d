"""Chunked curvature products: the split follows the shapes, and the products do not depend on it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfluence as tfl
from torchfluence import budget as budgets
from torchfluence import chunking


def test_plan_keeps_everything_in_one_call_on_a_gpu_and_within_budget_on_a_cpu():
    assert chunking.plan(1000, 5000, 10_000, 50, torch.device("cuda")) == chunking.Chunks(5000, 1000)
    small = chunking.plan(10, 32, 100, 500, torch.device("cpu"))
    assert small == chunking.Chunks(32, 10)  # fits: one call
    big = chunking.plan(690, 256, 660, 690, torch.device("cpu"), budget=1 << 23)
    assert big.vectors >= chunking.MIN_VECTORS and big.samples < 256
    assert big.vectors * (big.samples * 660 + 690) <= 1 << 23
    # Near-equal pieces: 256 samples in two chunks of 128, not 197 + 59.
    assert 256 % big.samples == 0
    # A sample alone over the budget still gets one sample and one vector per call.
    assert chunking.plan(8, 8, 1 << 30, 10, torch.device("cpu")) == chunking.Chunks(1, 1)


def test_kfac_temporaries_are_bounded_by_the_device_model(monkeypatch):
    """A ResNet-9's 512 x 4608 layer: on an 80 GB GPU a chunk's float32 temporary stays within
    1/64 of the memory (not the 9.7 GB of a whole 1024-sample block); on a CPU under 16 MiB."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 << 30))
    per_row = 512 * 4608
    rows = budgets.temporary_rows(per_row, torch.device("cuda"))
    assert 100 <= rows < 1024 and rows * per_row * 4 <= (80 << 30) // budgets.GPU_TEMPORARY_FRACTION
    assert budgets.temporary_rows(per_row, torch.device("cuda"), torch.bfloat16) == (80 << 30) // 64 // (per_row * 2)
    cpu = budgets.temporary_rows(per_row, torch.device("cpu"))
    assert cpu == 1 and budgets.temporary_rows(1024, torch.device("cpu")) * 1024 * 4 <= 16 << 20
    # float64 rows take twice the bytes: half the rows.
    assert budgets.temporary_rows(1024, torch.device("cpu"), torch.float64) * 2 == budgets.temporary_rows(
        1024, torch.device("cpu"))


def test_footprint_counts_leaf_module_outputs_and_the_input():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 10))
    x = torch.randn(5, 1, 8, 8)
    assert chunking.footprint(model, model, x) == 64 + 256 + 256 + 256 + 10
    assert chunking.footprint(model, model, x[:1]) == 64 + 256 + 256 + 256 + 10
    assert chunking.footprint(model, lambda _: 1 / 0, x) == 0  # a failing forward: no estimate, no chunks


@pytest.mark.parametrize("budget", [1 << 8, 1 << 12, 1 << 30])
def test_chunked_hessian_products_equal_the_float64_hessian(monkeypatch, budget):
    """Any split gives H v to float64 rounding: chunks only regroup a sum over samples
    (weighted by their share) and stack independent vectors. Tolerance: the float64
    Hessian's entries are O(1), sums of ~100 terms, so 1e-12 relative is rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)).double()
    x, y = torch.randn(37, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (37,))
    im = tfl.DirectInfluence(model, F.cross_entropy, 0.1, dtype=torch.float64)
    theta = im.functions.theta.clone()
    exact = torch.func.hessian(lambda t: im.functions.batch_loss(t, x, y))(theta)
    monkeypatch.setattr(budgets, "VMAP_CPU_ELEMENTS", budget)
    chunks = chunking.plan(im.num_params, 37, im.functions._footprint(x), im.num_params, torch.device("cpu"))
    if budget == 1 << 8:
        assert chunks.samples == 1 and chunks.vectors == 1
    v = torch.randn(im.num_params, im.num_params, dtype=torch.float64)
    got = im.functions.hvp(v, x, y)
    assert torch.allclose(got, v @ exact, rtol=1e-12, atol=1e-12)
    reused = im.functions.hessian_operator(x, y, im.num_params)
    assert torch.equal(reused(v), got)  # kept graphs: the same operations, the same bits
    assert torch.allclose(reused(v[:3]), got[:3], rtol=1e-12, atol=1e-12)
