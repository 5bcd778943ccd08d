"""torchfluence.pydvl.compute_influences: pyDVL's functional API as the seed notebook calls it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torchfluence as tf
from torchfluence.pydvl import compute_influences


@pytest.fixture(scope="module")
def classifier():
    """A small untrained CNN classifier, float64, in eval mode (its Hessian has eigenvalues down to about
    -2, so the tests regularize with 5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    return model, x, y


def test_the_notebooks_call(classifier):
    """The seed notebook's cell, keyword for keyword: a NumPy (n_test, n_train) array, indexed as the
    notebook does, equal to the core's influences."""
    model, x, y = classifier
    ce_loss = nn.CrossEntropyLoss()
    influences = compute_influences(model=model, loss=ce_loss, x=x, y=y, x_test=x[:5], y_test=y[:5],
                                    hessian_regularization=5.0, inversion_method="cg", influence_type="up")
    assert isinstance(influences, np.ndarray) and influences.shape == (5, 20)
    labels = y.numpy()
    assert influences[2][labels == int(labels[0])].shape == ((labels == int(labels[0])).sum(),)
    direct = tf.DirectInfluence(model, ce_loss, 5.0, head=False).fit((x, y)).influences(x[:5], y[:5], x, y)
    # CG to pyDVL's rtol**2 = 1e-8 on a well-conditioned float64 system.
    np.testing.assert_allclose(influences, direct.numpy(), rtol=1e-5, atol=1e-8 * float(direct.abs().max()))


@pytest.mark.parametrize("method", ["direct", "batched_cg", "lissa", "arnoldi", "ekfac"])
def test_inversion_methods_and_numpy_inputs(classifier, method):
    model, x, y = classifier
    kwargs = {"lissa": {"maxiter": 20, "scale": 100.0}, "arnoldi": {"rank": 5}}.get(method)
    out = compute_influences(model, nn.CrossEntropyLoss(), x.numpy(), y.numpy(), x[:3].numpy(), y[:3].numpy(),
                             inversion_method=method, hessian_regularization=5.0, inversion_method_kwargs=kwargs)
    assert out.shape == (3, 20) and np.isfinite(out).all()


def test_perturbation_and_default_test_points(classifier):
    model, x, y = classifier
    out = compute_influences(model, nn.CrossEntropyLoss(), x[:6], y[:6], influence_type="perturbation",
                             hessian_regularization=5.0)
    assert out.shape == (6, 6, 3, 6, 6)


def test_bad_arguments_are_named(classifier):
    model, x, y = classifier
    with pytest.raises(ValueError, match="inversion_method must be one of"):
        compute_influences(model, nn.CrossEntropyLoss(), x, y, inversion_method="qr")
    with pytest.raises(ValueError, match="mode"):
        compute_influences(model, nn.CrossEntropyLoss(), x, y, influence_type="down")
    with pytest.raises(NotImplementedError, match="max_step_size"):
        compute_influences(model, nn.CrossEntropyLoss(), x, y, inversion_method="cg",
                           inversion_method_kwargs={"max_step_size": 1.0})
