"""torchfluence.ptif with config["solver"] = "ekfac" / "kfac" on a BatchNorm ResNet.

A pytorch-influence-functions script cannot pass ``params=``: the BatchNorm parameters are left
out with the one coverage warning (not refused), and the numbers are those of the solver itself.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
import torchfluence.ptif as ptif
from torch.utils.data import DataLoader, TensorDataset

from tests.test_hf_models import build

pytest.importorskip("transformers")

DAMP = 0.01


@pytest.mark.parametrize("solver", ["ekfac", "kfac"])
def test_ptif_runs_kfac_solvers_on_a_batchnorm_resnet(solver, tmp_path):
    model, _, data = build("resnet")  # Hugging Face ResNet, float64, BatchNorm in eval mode
    x, y = data(20, seed=31)
    xt, yt = data(9, seed=32)
    config = {**ptif.get_default_config(), "outdir": str(tmp_path), "solver": solver, "damp": DAMP,
              "num_classes": 3, "batch_size": 8}
    # In order: the Fisher's sampled targets are addressed by each sample's place in the fitted loader.
    train_loader = DataLoader(TensorDataset(x, y), batch_size=6)
    with pytest.warns(UserWarning) as record:
        influences, harmful, helpful = ptif.calc_img_wise(config, model, train_loader,
                                                          DataLoader(TensorDataset(xt, yt), batch_size=4))
    lines = [str(w.message) for w in record if "covers" in str(w.message)]
    name = {"ekfac": "EkfacInfluence", "kfac": "KfacInfluence"}[solver]
    assert len(lines) == 1 and lines[0].startswith(f"{name} covers 7 captured layers (Conv2d, Linear; ")
    assert "BatchNorm2d (not a captured layer type): 12 parameter(s)" in lines[0]
    # A ptif config has no params=: the hint also names what a ptif user can do.
    assert lines[0].endswith("pass params= or set requires_grad=False on those to leave out")

    first_of_class = [int((yt == c).nonzero()[0]) for c in range(3)]  # test_sample_num=1 per class
    assert list(influences) == [str(i) for i in first_of_class]
    got = torch.tensor([entry["influence"] for entry in influences.values()], dtype=torch.float64)
    assert got.shape == (3, 20) and bool(torch.isfinite(got).all())
    for entry in influences.values():
        assert sorted(entry["harmful"]) == list(range(20)) and entry["helpful"] == entry["harmful"][::-1]
        assert entry["influence"][entry["harmful"][0]] == max(entry["influence"])
    assert sorted(harmful) == list(range(20)) and helpful == harmful[::-1]

    # ptif's influence is -(1/n) grad L(z_test)^T (F + damp I)^-1 grad L(z_j): the solver's scores
    # with the seed of the config (its Fisher's sampled targets), on the training set in order.
    cls = getattr(tfl, name)
    with pytest.warns(UserWarning, match="covers 7 captured layers"):
        im = cls(model, F.cross_entropy, DAMP, seed=config["seed"])
    expected = -im.fit((x, y)).influences(xt[first_of_class], yt[first_of_class], x, y) / len(x)
    # float64 sums of the same terms over other blocks.
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-9, atol=1e-15)
