"""torch.distributed: 2 and 3 processes (gloo, CPU, launched by torchrun) against one process.

Every solver shards the training blocks across processes and all-reduces its
sums, so results equal the one-process run up to the order of floating-point
additions. The job runs in float64: a reordered sum of ~200 terms differs by a
few ulp relative to its magnitude, so 1e-9 relative tolerance is ample and still
catches any missing or doubled block (an O(1/200) change). Top-k indices must
be equal exactly (the job's scores have no near-ties at that tolerance).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .distributed_job import run_job

JOB = Path(__file__).with_name("distributed_job.py")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, torch.Tensor]:
    return run_job(tmp_path_factory.mktemp("single"))


def _torchrun(processes: int, out: Path) -> list[dict[str, torch.Tensor]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(JOB.parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(JOB), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(processes)]


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_match_one_process(processes, single, tmp_path):
    ranks = _torchrun(processes, tmp_path)
    for r, results in enumerate(ranks):
        assert set(results) == set(single)
        for name, expected in single.items():
            got = results[name]
            assert got.shape == expected.shape, f"{name} on rank {r}"
            if got.dtype == torch.int64:
                assert torch.equal(got, expected), f"{name} on rank {r}: top-k indices differ"
            else:
                # Sums reordered across processes: a few ulp of float64 (see the module docstring).
                # CG stops at a relative residual of 1e-10, and a reordered sum can move that stop by one
                # iteration: its answers agree to about cond(H + lambda I) x 1e-10 (5e-11 measured).
                rtol = 1e-7 if name.startswith("cg.") else 1e-9
                torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-12, msg=f"{name} on rank {r}")
    # Every process ends with the same bits: the reductions give one answer everywhere.
    for r in range(1, processes):
        for name in single:
            assert torch.equal(ranks[r][name], ranks[0][name]), f"{name} differs between rank 0 and {r}"


def test_one_process_needs_no_group():
    import torchfluence.distributed as tdist

    assert tdist.world() == (0, 1) and not tdist.is_distributed()
    assert tdist.block_selector() is None
    assert not tdist.init_from_environment()  # WORLD_SIZE unset: nothing to join


def test_torchrun_demo(tmp_path):
    """``torchrun --nproc_per_node 2 -m torchfluence.demo`` runs, and one process writes the report."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "torchfluence.demo", "--out", str(tmp_path), "--epochs", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, f"torchrun demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["processes"] == 2
    assert done.stdout.count("| self-influence |") == 1  # printed by rank 0 only
