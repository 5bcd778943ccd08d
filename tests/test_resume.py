"""Resumable scoring jobs (``out=``, ``top_k(checkpoint=)``) and out-of-memory splitting.

A job killed with SIGKILL in a subprocess is rerun here: it must score only the
blocks its record does not hold as done and end with the same bits as an
uninterrupted run (every block's scores depend on that block alone, and the
top-k merge is exact). Reruns with another model, settings or data are refused;
truncated or corrupt files are reported. A block that raises CUDA's
out-of-memory error is scored in halves.

Run as a script (``python tests/test_resume.py JOB PATH KILL_AFTER``) this file is
the subprocess: it scores the same problem and kills itself before block KILL_AFTER.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchfluence import journal as ckpt

N_TRAIN, N_TEST, BLOCK, K = 150, 5, 16, 4
N_BLOCKS = 10  # (x, y) tensors in blocks of 16: the last one of 6 samples
LOADER_BLOCKS = 13  # batches of 24 in blocks of 16 + 8, and a last batch of 6
REG = 1e-2


_SOLVERS: dict = {}


def problem():
    """A small float64 MLP and data, the same bits in every process (built once per process)."""
    if "problem" not in _SOLVERS:
        _SOLVERS["problem"] = _problem()
    return _SOLVERS["problem"]


def _problem():
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5)
    x = torch.randn(N_TRAIN + N_TEST, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=generator)
    return model, x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def solver(model, x, y, reg=REG, block_size=BLOCK):
    """A fitted solver shared by the tests (fits dominate their time); overrides are undone after each."""
    key = (id(model), x.shape[0], reg, block_size)
    if key not in _SOLVERS:
        # Gauss-Newton: positive semi-definite at a random model, so the direct solve is well posed.
        _SOLVERS[key] = tfl.DirectInfluence(model, F.cross_entropy, reg, block_size=block_size,
                                            second_order="gauss_newton").fit((x, y))
    return _SOLVERS[key]


@pytest.fixture(autouse=True)
def _undo_overrides():
    yield
    for im in _SOLVERS.values():
        if isinstance(im, tfl.InfluenceFunctionModel):
            im.source.__dict__.pop("scores", None)
            im.functions.__dict__.pop("perturbation_scores", None)
            for name in ("solve", "_perturbation_functions"):
                im.__dict__.pop(name, None)


def loader(x, y, batch_size=24):
    """Batches that do not line up with the blocks (24 = 16 + 8): block indices are not offset // BLOCK."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def count_scores(im, on_call=None) -> list[int]:
    """Wraps the solver's scoring to record each call's block size (and run `on_call(number)` first)."""
    calls: list[int] = []
    score = type(im.source).score_block.__get__(im.source)  # the method itself, not an earlier wrapper

    def counted(factors, x, y):
        if on_call is not None:
            on_call(len(calls))
        calls.append(x.shape[0])
        return score(factors, x, y)

    im.source.score_block = counted
    return calls


def run_job(job: str, path: Path, kill_after: int = -1, delay: float = 0.0):
    """Scores the problem with a resumable `job`; kills the process before block `kill_after` when >= 0."""
    model, x, y, xt, yt = problem()
    im = solver(model, x, y)

    def on_call(number):
        if number == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(delay)

    calls = count_scores(im, on_call)
    if job == "influences":
        return im.influences(xt, yt, x, y, out=path), calls
    return im.top_k(xt, yt, loader(x, y), k=K, checkpoint=path), calls


def kill_midway(job: str, path: Path, kill_after: int) -> None:
    """Runs `job` in a subprocess that SIGKILLs itself before block `kill_after`."""
    # Slow blocks (0.2 s) make every block's record due: a save takes ~10-30 ms, and one is made
    # once 10x that has passed since the last (journal.SAVE_TIME_RATIO).
    cmd = [sys.executable, __file__, job, str(path), str(kill_after)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == -signal.SIGKILL, f"not killed:\n{done.stdout}\n{done.stderr[-3000:]}"


def topk_fields(top):
    return [top.helpful_indices, top.helpful_values, top.harmful_indices, top.harmful_values]


@pytest.fixture
def save_every_block(monkeypatch):
    """Records saved after every block, so in-process partial jobs have a known record."""
    monkeypatch.setattr(ckpt, "SAVE_TIME_RATIO", 0)


def interrupt_at(number: int):
    """An `on_call` for :func:`count_scores` that interrupts the job before block `number`."""

    def on_call(n):
        if n == number:
            raise KeyboardInterrupt

    return on_call


def partial_job(path: Path, blocks: int):
    """An influences(out=path) job that stopped (an exception) after `blocks` blocks."""
    model, x, y, xt, yt = problem()
    im = solver(model, x, y)
    count_scores(im, interrupt_at(blocks))
    with pytest.raises(KeyboardInterrupt):
        im.influences(xt, yt, x, y, out=path)
    del im.source.score_block
    return json.loads(ckpt.sidecar_path(path).read_text())


# -- (a), (b): SIGKILL, then resume --------------------------------------------------------------------
posix = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


@posix
def test_influences_resume_after_sigkill(tmp_path):
    path = tmp_path / "scores.npy"
    kill_midway("influences", path, kill_after=4)
    record = json.loads(ckpt.sidecar_path(path).read_text())
    assert not record["complete"]
    assert len(record["blocks"]) == 1 and record["blocks"][0][0] == 0 and record["blocks"][0][2] == 0
    done_blocks, done_samples = record["blocks"][0][1], record["blocks"][0][3]
    assert 1 <= done_blocks <= 4 and done_samples == BLOCK * done_blocks

    model, x, y, xt, yt = problem()
    expected = solver(model, x, y).influences(xt, yt, x, y)
    # The file holds the recorded blocks' scores already: their pages were flushed before the record.
    saved = np.load(path, mmap_mode="r")
    assert np.array_equal(saved[:, :done_samples], expected[:, :done_samples].numpy())

    resumed, calls = run_job("influences", path)
    assert len(calls) == N_BLOCKS - done_blocks  # finished blocks are not scored again
    assert torch.equal(resumed, expected)  # bitwise: the same block computations as one run
    uninterrupted, _ = run_job("influences", tmp_path / "whole.npy")
    assert torch.equal(resumed, uninterrupted)
    assert json.loads(ckpt.sidecar_path(path).read_text())["complete"]

    again, calls = run_job("influences", path)  # a finished job: nothing is scored
    assert calls == [] and torch.equal(again, expected)


@posix
def test_top_k_resume_after_sigkill(tmp_path):
    path = tmp_path / "topk.safetensors"
    kill_midway("top_k", path, kill_after=5)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()[ckpt.METADATA_KEY])
        n_seen = int(f.get_tensor("n_seen"))
    assert not record["complete"] and len(record["blocks"]) == 1
    done_blocks = record["blocks"][0][1]
    assert 1 <= done_blocks <= 5 and n_seen == record["blocks"][0][3]

    model, x, y, xt, yt = problem()
    expected = solver(model, x, y).top_k(xt, yt, loader(x, y), k=K)
    resumed, calls = run_job("top_k", path)
    assert len(calls) == LOADER_BLOCKS - done_blocks
    for got, want in zip(topk_fields(resumed), topk_fields(expected)):
        assert torch.equal(got, want)  # the merge is exact and order-free: bitwise equal
    again, calls = run_job("top_k", path)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(topk_fields(again), topk_fields(expected)))


def test_complete_job_computes_nothing(tmp_path):
    model, x, y, xt, yt = problem()
    im = solver(model, x, y)
    first = im.influences(xt, yt, x, y, out=tmp_path / "s.npy").clone()
    solves = []
    solve = im.solve
    im.solve = lambda v: solves.append(1) or solve(v)
    calls = count_scores(im)
    again = im.influences(xt, yt, x, y, out=tmp_path / "s.npy")
    assert calls == [] and solves == [] and torch.equal(again, first)


def test_perturbation_resumes(tmp_path, save_every_block):
    model, x, y, xt, yt = problem()
    im = solver(model, x, y)
    expected = im.influences(xt, yt, x, y, mode="perturbation")
    path = tmp_path / "p.npy"
    functions = im._perturbation_functions()
    score, calls, stop = functions.perturbation_scores, [], []

    def counted(factors, xb, yb):
        if len(calls) == 3 and not stop:
            raise KeyboardInterrupt
        calls.append(xb.shape[0])
        return score(factors, xb, yb)

    functions.perturbation_scores = counted
    im._perturbation_functions = lambda: functions
    with pytest.raises(KeyboardInterrupt):
        im.influences(xt, yt, x, y, mode="perturbation", out=path)
    stop.append(True)
    got = im.influences(xt, yt, x, y, mode="perturbation", out=path)
    assert len(calls) == N_BLOCKS and torch.equal(got, expected)


def test_nonfinite_block_is_not_recorded(tmp_path, save_every_block):
    """A block whose scores hold NaN raises and stays unfinished: a rerun scores it again."""
    model, x, y, xt, yt = problem()
    im = solver(model, x, y)
    expected = im.influences(xt, yt, x, y)
    score, scored = type(im.source).score_block.__get__(im.source), []

    def nan_in_block_3(factors, xb, yb):
        scored.append(xb.shape[0])
        values = score(factors, xb, yb)
        return values * float("nan") if len(scored) == 4 else values

    im.source.score_block = nan_in_block_3
    path = tmp_path / "s.npy"
    with pytest.raises(ValueError, match="NaN or inf"):
        im.influences(xt, yt, x, y, out=path)
    assert json.loads(ckpt.sidecar_path(path).read_text())["blocks"] == [[0, 3, 0, 48]]
    del im.source.score_block
    calls = count_scores(im)
    assert torch.equal(im.influences(xt, yt, x, y, out=path), expected) and len(calls) == N_BLOCKS - 3


# -- (c) refusals ----------------------------------------------------------------------------------------
def _refused(call, *words):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "belongs to another job" in message and "Delete" in message, message
    for word in words:
        assert word in message, message


def test_refuses_another_job(tmp_path):
    model, x, y, xt, yt = problem()
    path = tmp_path / "s.npy"
    solver(model, x, y).influences(xt, yt, x, y, out=path)

    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3  # one weight
    _refused(lambda: solver(other, x, y).influences(xt, yt, x, y, out=path), "the model")
    _refused(lambda: solver(model, x, y, reg=0.1).influences(xt, yt, x, y, out=path),
             "regularization (0.01 in the record, 0.1 now)")
    _refused(lambda: solver(model, x, y).influences(xt, yt, x[:140], y[:140], out=path), "n_train (150")
    xt2 = xt.clone()
    xt2[0, 0] += 1e-9
    _refused(lambda: solver(model, x, y).influences(xt2, yt, x, y, out=path), "the test data")
    _refused(lambda: solver(model, x, y).train_influences(xt, yt, out=path), "job ('influences'")
    _refused(lambda: solver(model, x, y, block_size=8).influences(xt, yt, x, y, out=path), "block_size (16")

    top = tmp_path / "top.safetensors"
    solver(model, x, y).top_k(xt, yt, loader(x, y), k=K, checkpoint=top)
    _refused(lambda: solver(model, x, y).top_k(xt, yt, loader(x, y), k=K + 1, checkpoint=top), "k (4")
    _refused(lambda: solver(other, x, y).top_k(xt, yt, loader(x, y), k=K, checkpoint=top), "the model")
    _refused(lambda: solver(model, x, y).top_k(xt2, yt, loader(x, y), k=K, checkpoint=top), "the test data")


def test_refuses_factors_of_another_fit(tmp_path, save_every_block):
    """Same model, settings and scored data, but a solver fitted on other data: its factors differ."""
    path = tmp_path / "s.npy"
    partial_job(path, blocks=3)
    model, x, y, xt, yt = problem()
    refit = solver(model, x[:100], y[:100])
    with pytest.raises(ValueError, match="the test factors differ"):
        refit.influences(xt, yt, x, y, out=path)


def test_refuses_other_batches(tmp_path, save_every_block):
    """The same samples in other batches put other samples in a block: the record's boundaries catch it."""
    model, x, y, xt, yt = problem()
    im = solver(model, x, y)
    path = tmp_path / "top.safetensors"
    count_scores(im, interrupt_at(3))
    with pytest.raises(KeyboardInterrupt):
        im.top_k(xt, yt, loader(x, y, 24), k=K, checkpoint=path)
    del im.source.score_block
    with pytest.raises(ValueError, match="same batches"):
        solver(model, x, y).top_k(xt, yt, loader(x, y, 20), k=K, checkpoint=path)


def test_refuses_several_processes(tmp_path, monkeypatch):
    """A job's record is written by one process: a process group is refused, not silently mixed."""
    model, x, y, xt, yt = problem()
    monkeypatch.setattr(ckpt, "is_distributed", lambda: True)
    with pytest.raises(NotImplementedError, match="out= .* runs in one process"):
        solver(model, x, y).influences(xt, yt, x, y, out=tmp_path / "s.npy")
    with pytest.raises(NotImplementedError, match="checkpoint= .* runs in one process"):
        solver(model, x, y).top_k(xt, yt, k=K, checkpoint=tmp_path / "t.safetensors")


# -- (d) truncated or corrupt files ----------------------------------------------------------------------
def test_truncated_npy(tmp_path, save_every_block):
    path = tmp_path / "s.npy"
    partial_job(path, blocks=3)
    model, x, y, xt, yt = problem()
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(ValueError, match="truncated or corrupt.*Delete"):
        solver(model, x, y).influences(xt, yt, x, y, out=path)
    np.save(path, np.zeros((N_TEST, N_TRAIN), dtype=np.float32))  # a whole file of another dtype
    with pytest.raises(ValueError, match="float32 array, expected"):
        solver(model, x, y).influences(xt, yt, x, y, out=path)
    path.write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="not a readable .npy"):
        solver(model, x, y).influences(xt, yt, x, y, out=path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        solver(model, x, y).influences(xt, yt, x, y, out=path)


def test_corrupt_sidecar(tmp_path, save_every_block):
    path = tmp_path / "s.npy"
    record = partial_job(path, blocks=3)
    model, x, y, xt, yt = problem()
    sidecar = ckpt.sidecar_path(path)
    text = sidecar.read_text()
    sidecar.write_text(text[: len(text) // 2])  # cut mid-write (an atomic write never leaves this)
    with pytest.raises(ValueError, match="not valid JSON"):
        solver(model, x, y).influences(xt, yt, x, y, out=path)
    record["blocks"] = [[0, 3, 0, 48], [2, 5, 32, 80]]  # overlapping ranges
    sidecar.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="corrupt or not a torchfluence job record"):
        solver(model, x, y).influences(xt, yt, x, y, out=path)
    record["blocks"], record["complete"] = [[0, 3, 0, 48]], True  # "complete" with 48 of 150 samples
    sidecar.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="48 finished samples for a complete job over 150"):
        solver(model, x, y).influences(xt, yt, x, y, out=path)


def test_corrupt_topk_checkpoint(tmp_path):
    model, x, y, xt, yt = problem()
    path = tmp_path / "top.safetensors"
    solver(model, x, y).top_k(xt, yt, loader(x, y), k=K, checkpoint=path)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        solver(model, x, y).top_k(xt, yt, loader(x, y), k=K, checkpoint=path)


# -- (e) out-of-memory splitting -------------------------------------------------------------------------
def oom_above(im, limit: int) -> list[int]:
    """Makes scoring raise CUDA's out-of-memory error for blocks of more than `limit` samples."""
    calls: list[int] = []
    score = type(im.source).score_block.__get__(im.source)  # the method itself, not an earlier wrapper

    def limited(factors, x, y):
        calls.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test: more than {limit} samples)")
        return score(factors, x, y)

    im.source.score_block = limited
    return calls


def test_oom_halves_the_block(tmp_path):
    model, x, y, xt, yt = problem()
    im = solver(model, x, y)
    expected = im.influences(xt, yt, x, y)
    calls = oom_above(im, 5)
    with pytest.warns(RuntimeWarning) as caught:
        got = im.influences(xt, yt, x, y, out=tmp_path / "s.npy")
    messages = [str(w.message) for w in caught]
    assert any("scoring 16 samples" in m and "at most 8 samples" in m for m in messages), messages
    assert any("scoring 8 samples" in m and "at most 4 samples" in m for m in messages), messages
    # Only the first block tries 16 and 8 samples; every later piece starts at the reduced size.
    assert calls[:2] == [16, 8] and max(calls[2:]) == 4 and sum(calls[2:]) == N_TRAIN
    # Each score is one dot product grad L(z_test)^T (H + lambda I)^-1 grad L(z_j); splitting only
    # changes the width of the matrix products, which may reorder a float64 sum over p = 103
    # parameters: a few ulp of |f| |g| (1e-14 relative is ample).
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14 * expected.abs().max().item())
    assert json.loads(ckpt.sidecar_path(tmp_path / "s.npy").read_text())["score_chunk"] == 4

    perturbation = im.influences(xt, yt, x, y, mode="perturbation")  # its pieces join along dimension 1
    functions = im._perturbation_functions()
    score = functions.perturbation_scores

    def limited(factors, xb, yb):
        if xb.shape[0] > 9:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return score(factors, xb, yb)

    functions.perturbation_scores = limited
    im._perturbation_functions = lambda: functions
    with pytest.warns(RuntimeWarning, match="at most 8 samples"):
        split = im.influences(xt, yt, x, y, mode="perturbation")
    torch.testing.assert_close(split, perturbation, rtol=1e-12, atol=1e-14 * perturbation.abs().max().item())


def test_oom_resumed_job_keeps_the_reduced_size(tmp_path, save_every_block):
    model, x, y, xt, yt = problem()
    path = tmp_path / "s.npy"
    im = solver(model, x, y)
    calls = oom_above(im, 5)
    score = im.source.score_block

    def stop_after_three_blocks(factors, xb, yb):
        if sum(c for c in calls if c <= 5) >= 3 * BLOCK:
            raise KeyboardInterrupt
        return score(factors, xb, yb)

    im.source.score_block = stop_after_three_blocks
    with pytest.warns(RuntimeWarning), pytest.raises(KeyboardInterrupt):
        im.influences(xt, yt, x, y, out=path)
    resumed = solver(model, x, y)
    again = oom_above(resumed, 1000)  # no error now: the calls show the size the job starts at
    resumed.influences(xt, yt, x, y, out=path)
    assert max(again) == 4


def test_oom_below_one_sample_propagates():
    model, x, y, xt, yt = problem()
    im = solver(model, x, y)
    oom_above(im, 0)
    with pytest.warns(RuntimeWarning), pytest.raises(torch.cuda.OutOfMemoryError):
        im.influences(xt, yt, x, y)


if __name__ == "__main__":
    run_job(sys.argv[1], Path(sys.argv[2]), kill_after=int(sys.argv[3]), delay=0.2)
