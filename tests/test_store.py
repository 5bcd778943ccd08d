"""GradientStore: build, open, scoring against the projected solvers, resumable builds, refusals."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import torchfluence as tfl
from torchfluence import projected_space as projected, store as store_module

ROOT = Path(__file__).resolve().parents[1]
LOSS = F.cross_entropy
# Unit roundoff of the storage formats (round to nearest): 2^-11 for float16 (10 stored
# mantissa bits), 2^-8 for bfloat16 (7); float16's subnormals (below 2^-14) are spaced
# 2^-24, so a value there is off by up to 2^-25 absolutely.
STORAGE_ROUNDOFF = {torch.float16: (2.0**-11, 2.0**-25), torch.bfloat16: (2.0**-8, 0.0)}
F32 = 2.0**-24


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (300,), generator=gen)
    xt = torch.randn(6, 8, dtype=torch.float64, generator=gen)
    yt = torch.randint(0, 4, (6,), generator=gen)
    return x, y, xt, yt


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def rounding_bound(s: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|store score - exact score| bound, (n_q, n): storage rounding of g, float32 rounding of s and the sum.

    The store computes fl32(s) . fl16(g) with float32 accumulation over k terms; each
    term's operands are off by u16 |g| + abs16 and u32 |s|, and the k-term float32
    sum adds at most k u32 sum |s g| (Higham 3.1), with a 1% margin for second-order terms.
    """
    u, tiny = STORAGE_ROUNDOFF[dtype]
    s, g = s.double().abs(), g.double().abs()
    k = s.shape[1]
    return 1.01 * ((u + (k + 2) * F32) * (s @ g.T) + tiny * s.sum(1, keepdim=True))


def assert_topk_consistent(top, exact: torch.Tensor, bound: torch.Tensor, k: int) -> None:
    """The store's top-k against exact scores, up to the rounding bound.

    Sorting is 1-Lipschitz in the max norm, so each sorted value is within the row's
    largest bound; an index must agree wherever the exact scores around that rank are
    separated by more than twice the bound (no perturbation within it can swap them).
    """
    for values, indices, descending in ((top.helpful_values, top.helpful_indices, True),
                                        (top.harmful_values, top.harmful_indices, False)):
        order = exact.argsort(dim=1, descending=descending, stable=True)
        sorted_exact = exact.gather(1, order)
        for q in range(exact.shape[0]):
            b = float(bound[q].max())
            assert float((values[q].double() - sorted_exact[q, :k]).abs().max()) <= b
            gaps = (sorted_exact[q, 1:] - sorted_exact[q, :-1]).abs()
            for r in range(k):
                before = float(gaps[r - 1]) if r > 0 else float("inf")
                if min(before, float(gaps[r])) > 2 * b:
                    assert int(indices[q, r]) == int(order[q, r]), (q, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_store_top_k_equals_projected_solvers(tmp_path, data, dtype):
    x, y, xt, yt = data
    model = make_model()
    projector = tfl.SparseJLProjector(num_params(model), 64, seed=1)
    store = tfl.GradientStore.build(model, LOSS, (x, y), projector, tmp_path / "store", dtype=dtype, block_size=64,
                                    progress=False)
    assert (store.n_train, store.k, store.dtype) == (300, 64, dtype)
    store = tfl.GradientStore.open(tmp_path / "store", model=model)
    stored = store.gradients  # (300, 64) in the storage dtype

    gs = tfl.GradientSimilarity(model, LOSS, projector=projector).fit((x, y))
    phi = gs.grads(x, y)  # float64 projected gradients, as the store computed them
    # The file holds the float64 gradients rounded once to the storage dtype.
    assert torch.equal(stored, phi.to(dtype))
    assert torch.allclose(store.fisher, phi.T @ phi / 300, rtol=0, atol=1e-15)
    queries = gs.grads(xt, yt)
    assert torch.equal(store.query_gradients(model, LOSS, xt, yt), queries)

    reg = 0.05
    direct = tfl.DirectInfluence(model, LOSS, reg, projector=projector).fit((x, y))
    cases = [(None, gs, queries), (reg, direct, direct.solve(queries))]
    for regularization, solver, s in cases:
        exact = solver.influences(xt, yt, x, y)  # float64 from unrounded gradients
        bound = rounding_bound(s, phi, dtype)
        scores = store.scores((model, LOSS, xt, yt), regularization=regularization)
        assert scores.dtype == torch.float32 and scores.shape == (6, 300)
        assert bool(((scores.double() - exact).abs() <= bound).all())
        # Against the same stored values, exactly: only the float32 sum's rounding remains.
        same = s.float().double() @ stored.double().T
        tight = 1.01 * (s.shape[1] + 2) * F32 * (s.double().abs() @ stored.double().abs().T)
        assert bool(((scores.double() - same).abs() <= tight).all())
        for k in (1, 7):
            top = store.top_k((model, LOSS, xt, yt), k=k, regularization=regularization)
            reference = solver.top_k(xt, yt, k=k)  # the projected solver's, from unrounded gradients
            # The solver's lists are the exact ones (float64 scores, no ties here)...
            assert torch.equal(reference.helpful_indices, exact.argsort(1, descending=True)[:, :k])
            assert torch.equal(reference.harmful_indices, exact.argsort(1)[:, :k])
            # ...and the store's agree with them up to the storage rounding.
            assert_topk_consistent(top, exact, bound, k)
        # Tensor queries and the .npy output give the same bits.
        out = store.scores(queries, regularization=regularization, out=tmp_path / "scores.npy")
        assert torch.equal(out, scores)
        assert np.array_equal(np.load(tmp_path / "scores.npy"), scores.numpy())
        # Other chunks: the float32 products may be summed in another order (BLAS blocking).
        chunked = store.scores(queries, regularization=regularization, chunk_rows=37)
        assert bool(((chunked.double() - same).abs() <= tight).all())


def test_kronecker_store_matches_kronecker_source(tmp_path, data):
    x, y, xt, yt = data
    model = make_model()
    spec = tfl.KroneckerProjection(4, 4, seed=3)
    store = tfl.GradientStore.build(model, LOSS, (x, y), spec, tmp_path / "kron", block_size=100, progress=False)
    im = tfl.GradientSimilarity(model, LOSS, projector=spec).fit((x, y))
    assert store.k == im.num_params == 4 * 4 + 4 * 4
    assert store.metadata["settings"]["projector"]["layers"] == [["0", 4, 4], ["2", 4, 4]]
    assert torch.equal(store.gradients, im.grads(x, y).half())
    assert torch.equal(store.query_gradients(model, LOSS, xt, yt), im.grads(xt, yt))


class Interrupted(Exception):
    pass


class Flaky(Dataset):
    """(x, y) items; reading item `fail_at` or later raises (a stopped job)."""

    def __init__(self, x, y, fail_at=None):
        self.x, self.y, self.fail_at = x, y, fail_at

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.fail_at is not None and i >= self.fail_at:
            raise Interrupted(f"stopped at sample {i}")
        return self.x[i], self.y[i]


def store_files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in ("store.json", "gradients.bin", "fisher.safetensors")}


def count_rows(monkeypatch) -> list[int]:
    rows: list[int] = []
    grads = projected.ProjectedGradients.grads

    def counted(self, x, y, out=None):
        rows.append(x.shape[0])
        return grads(self, x, y, out)

    monkeypatch.setattr(projected.ProjectedGradients, "grads", counted)
    return rows


def test_resume_after_an_exception_recomputes_nothing_finished(tmp_path, data, monkeypatch):
    x, y, _, _ = data
    model = make_model()
    projector = tfl.SparseJLProjector(num_params(model), 48, seed=2)

    def build(path, fail_at=None):
        loader = DataLoader(Flaky(x, y, fail_at), batch_size=32)
        return tfl.GradientStore.build(model, LOSS, loader, projector, path, block_size=32, progress=False)

    build(tmp_path / "whole")
    rows = count_rows(monkeypatch)
    with pytest.raises(Interrupted):
        build(tmp_path / "resumed", fail_at=100)
    assert sum(rows) == 96  # blocks 0..2; block 3 failed while loading
    record, _ = store_module._read_fisher(tmp_path / "resumed")
    assert (record["blocks"], record["complete"]) == ([[0, 3, 0, 96]], False)  # blocks 0..2, samples 0..95
    with pytest.raises(ValueError, match="incomplete"):
        tfl.GradientStore.open(tmp_path / "resumed")
    rows.clear()
    build(tmp_path / "resumed")
    assert sum(rows) == 300 - 96  # only the unfinished blocks
    assert store_files(tmp_path / "resumed") == store_files(tmp_path / "whole")  # the same bytes
    rows.clear()
    build(tmp_path / "resumed")  # finished: opened as it is
    assert rows == []
    # Stopped after the final record but before store.json said complete: finished without work.
    meta = tmp_path / "resumed" / "store.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), complete=False), indent=1))
    with pytest.raises(ValueError, match="incomplete"):
        tfl.GradientStore.open(tmp_path / "resumed")
    build(tmp_path / "resumed")
    assert rows == []
    assert store_files(tmp_path / "resumed") == store_files(tmp_path / "whole")


def test_resume_after_sigkill(tmp_path, data):
    x, y, _, _ = data
    model = make_model()
    torch.save({"state": model.state_dict(), "x": x, "y": y}, tmp_path / "inputs.pt")
    marker = tmp_path / "reached"
    script = textwrap.dedent(f"""
        import time, torch, torch.nn.functional as F
        from torch import nn
        from torch.utils.data import DataLoader, Dataset
        import torchfluence as tfl
        saved = torch.load({str(tmp_path / "inputs.pt")!r})
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()
        model.load_state_dict(saved["state"])
        class Slow(Dataset):
            def __len__(self):
                return 300
            def __getitem__(self, i):
                if i >= 200:
                    open({str(marker)!r}, "w").close()
                    time.sleep(600)  # killed here
                return saved["x"][i], saved["y"][i]
        projector = tfl.SparseJLProjector(sum(p.numel() for p in model.parameters()), 48, seed=2)
        tfl.GradientStore.build(model, F.cross_entropy, DataLoader(Slow(), batch_size=20), projector,
                                {str(tmp_path / "killed")!r}, block_size=20, progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the build ended before the kill: {child.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "the build did not reach sample 200 in 120 s"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    record, _ = store_module._read_fisher(tmp_path / "killed")
    done = sum(stop - start for start, stop, _, _ in record["blocks"]) if record is not None else 0
    assert 1 <= done <= 10 and not record["complete"]
    projector = tfl.SparseJLProjector(num_params(model), 48, seed=2)
    whole = tfl.GradientStore.build(model, LOSS, DataLoader(Flaky(x, y), batch_size=20), projector,
                                    tmp_path / "whole", block_size=20, progress=False)
    resumed = tfl.GradientStore.build(model, LOSS, DataLoader(Flaky(x, y), batch_size=20), projector,
                                      tmp_path / "killed", block_size=20, progress=False)
    assert store_files(resumed.path) == store_files(whole.path)


def test_other_model_settings_or_data_refused(tmp_path, data):
    x, y, xt, yt = data
    model = make_model()
    projector = tfl.SparseJLProjector(num_params(model), 16, seed=0)
    path = tmp_path / "store"
    store = tfl.GradientStore.build(model, LOSS, (x, y), projector, path, block_size=64, progress=False)
    other = make_model(seed=1)
    with pytest.raises(ValueError, match="built with another model"):
        tfl.GradientStore.open(path, model=other)
    with pytest.raises(ValueError, match="built with another model"):
        store.top_k((other, LOSS, xt, yt), k=3)
    with pytest.raises(ValueError, match="what differs: the model"):
        tfl.GradientStore.build(other, LOSS, (x, y), projector, path, block_size=64, progress=False)
    with pytest.raises(ValueError, match=r"block_size \(64 in the store, 32 now\)"):
        tfl.GradientStore.build(model, LOSS, (x, y), projector, path, block_size=32, progress=False)
    with pytest.raises(ValueError, match="projector"):
        tfl.GradientStore.build(model, LOSS, (x, y), tfl.SparseJLProjector(num_params(model), 16, seed=1), path,
                                block_size=64, progress=False)
    with pytest.raises(ValueError, match="train_data"):
        tfl.GradientStore.build(model, LOSS, (x + 1, y), projector, path, block_size=64, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        tfl.GradientStore.build(model, LOSS, (x, y), projector, path, block_size=64, progress=False,
                                dtype=torch.bfloat16)


def test_bad_inputs(tmp_path, data):
    x, y, xt, yt = data
    model = make_model()
    p = num_params(model)
    projector = tfl.SparseJLProjector(p, 16)
    build = tfl.GradientStore.build
    with pytest.raises(ValueError, match="dtype must be torch.float16 or torch.bfloat16"):
        build(model, LOSS, (x, y), projector, tmp_path / "a", dtype=torch.float32, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="which is a file"):
        build(model, LOSS, (x, y), projector, tmp_path / "file", progress=False)
    with pytest.raises(ValueError, match=f"its p must be the number of selected parameters, {p}"):
        build(model, LOSS, (x, y), tfl.SparseJLProjector(p + 1, 16), tmp_path / "b", progress=False)

    class Custom(tfl.DenseProjector):
        pass

    with pytest.raises(TypeError, match="records how to rebuild it"):
        build(model, LOSS, (x, y), Custom(p, 4), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        build(model, LOSS, (x, y), projector, tmp_path / "d", block_size=0, progress=False)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "gradients.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a gradient store"):
        build(model, LOSS, (x, y), projector, tmp_path / "e", progress=False)
    with pytest.raises(FileNotFoundError, match="no gradient store"):
        tfl.GradientStore.open(tmp_path / "nothing")

    store = build(model, LOSS, (x, y), projector, tmp_path / "s", fisher=False, progress=False)
    with pytest.raises(ValueError, match="at most the number of stored training samples \\(300\\), got 301"):
        store.top_k(torch.zeros(2, 16), k=301)
    with pytest.raises(ValueError, match=r"queries must be a floating \(n_q, 16\) tensor"):
        store.top_k(torch.zeros(2, 15), k=3)
    with pytest.raises(ValueError, match="NaN"):
        store.top_k(torch.full((2, 16), float("nan")), k=3)
    with pytest.raises(ValueError, match="queries must be"):
        store.scores((model, LOSS, xt), regularization=None)
    with pytest.raises(ValueError, match="fisher=False"):
        store.top_k(torch.zeros(2, 16), k=3, regularization=0.1)
    with pytest.raises(ValueError, match="regularization must be a finite number >= 0"):
        store.top_k(torch.zeros(2, 16), k=3, regularization=-1.0)
    with pytest.raises(ValueError, match=r"out must be a \(2, 300\) float32 tensor"):
        store.scores(torch.zeros(2, 16), out=torch.zeros(2, 300, dtype=torch.float64))

    few = build(model, LOSS, (x[:10], y[:10]), projector, tmp_path / "f", progress=False)
    with pytest.raises(ValueError, match="not positive definite"):
        few.top_k(torch.zeros(2, 16), k=3, regularization=0.0)  # 10 samples: F (16 x 16) has rank <= 10
