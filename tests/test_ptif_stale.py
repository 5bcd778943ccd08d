"""The ptif drop-in's saved files: a rerun never reuses files made from other data, and a damaged file
gets an error that names it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchfluence.ptif as ptif

from .digits import digits, loader, mlp, train


@pytest.fixture(scope="module")
def problem():
    x, y, xt, yt = digits(n_train=64, n_test=10)
    return train(mlp(), x, y, steps=60), x, y, xt, yt


def _config(tmp_path, name="save"):
    return {**ptif.get_default_config(), "outdir": str(tmp_path / "out"), "save_pth": str(tmp_path / name),
            "solver": "direct", "damp": 1.0, "test_sample_num": 1, "batch_size": 32}


def test_changed_training_labels_are_refused(problem, tmp_path):
    model, x, y, xt, yt = problem
    ptif.calc_all_grad_then_test(_config(tmp_path), model, loader(x, y), loader(xt, yt))
    flipped = y.clone()
    flipped[:5] = (flipped[:5] + 1) % 10
    with pytest.raises(ValueError, match="another run.*train_data"):
        ptif.calc_all_grad_then_test(_config(tmp_path), model, loader(x, flipped), loader(xt, yt))


def test_changed_test_inputs_recompute_s_test(problem, tmp_path):
    """New test inputs under the same indices: their s_test files are recomputed, and the results are
    those of a run in an empty folder."""
    model, x, y, xt, yt = problem
    ptif.calc_all_grad_then_test(_config(tmp_path), model, loader(x, y), loader(xt, yt))
    shifted = xt + 0.5
    rerun, _, _ = ptif.calc_all_grad_then_test(_config(tmp_path), model, loader(x, y), loader(shifted, yt))
    fresh, _, _ = ptif.calc_all_grad_then_test(_config(tmp_path, "fresh"), model, loader(x, y),
                                               loader(shifted, yt))
    for key, entry in fresh.items():
        assert np.allclose(rerun[key]["influence"], entry["influence"], rtol=1e-12, atol=0)


def test_damaged_files_are_named(problem, tmp_path):
    model, x, y, xt, yt = problem
    config = _config(tmp_path)
    ptif.calc_all_grad_then_test(config, model, loader(x, y), loader(xt, yt))
    block = tmp_path / "save" / "grad_z" / "0-32.grad_z"
    block.write_bytes(block.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="0-32.grad_z: cannot be read"):
        ptif.calc_all_grad_then_test(config, model, loader(x, y), loader(xt, yt))
    block.unlink()
    s_test = sorted((tmp_path / "save" / "s_test").iterdir())[0]
    torch.save([torch.zeros(3)], s_test)  # readable, wrong shapes
    with pytest.raises(ValueError, match=f"{s_test.name}: expected an s_test of parameter shapes"):
        ptif.calc_all_grad_then_test(config, model, loader(x, y), loader(xt, yt))
