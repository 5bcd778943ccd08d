"""Hugging Face vision models beyond tests/test_hf_models.py: ResNet (BatchNorm) and ViT (class token,
position embeddings) at tiny size in float64.

tests/test_hf_models.py already checks both models' per-sample gradients against torch.func, EK-FAC,
K-FAC, CG, Arnoldi and plain gradient similarity with their defaults, K-FAC's coverage line on the
ResNet and a Direct solve through ViT attention. Here: EK-FAC's formula on convolutions and patch
embeddings (also where a convolution's padding taps are always zero), the coverage line and refusals
of ViT's bare parameters, the remaining solvers, a Direct solve through BatchNorm, CG with an EK-FAC
preconditioner beside BatchNorm, and the training-mode warning. References come from the same file's
``functional_call`` + ``vmap(grad)`` and dense Hessians.
"""

import pytest
import torch
import torchfluence as tfl
from torch import nn

from tests.test_hf_models import REG, build, check_solver_runs, reference_grads, reference_hessian
from tests.test_transformers import _layer_blocks as layer_blocks

transformers = pytest.importorskip("transformers")

# What each model's EK-FAC and K-FAC leave out by default, as their one warning line says it.
LEFT_OUT = {
    "resnet": ("covers 7 captured layers (Conv2d, Linear; 5,963 values) and leaves out 144 values: "
               "BatchNorm2d (not a captured layer type): 12 parameter(s) such as "
               "resnet.embedder.embedder.normalization"),
    "vit": ("covers 14 captured layers (Conv2d, Linear; 5,155 values) and leaves out 448 values: "
            "ViTEmbeddings (not a captured layer type): 2 parameter(s) such as vit.embeddings.cls_token; "
            "LayerNorm (not a captured layer type): 10 parameter(s) such as "
            "vit.layers.0.layernorm_before.weight"),
}
UNCAPTURED = {"resnet": (nn.BatchNorm2d,),
              "vit": (nn.LayerNorm, transformers.models.vit.modeling_vit.ViTEmbeddings)}


def captured_names(model: nn.Module, family: str) -> list:
    """The parameters of the convolutions and Linear layers, in the model's order."""
    skip = {id(p) for m in model.modules() if isinstance(m, UNCAPTURED[family])
            for p in m.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if id(p) not in skip]


@pytest.mark.parametrize("family, solver", [("resnet", "EkfacInfluence"), ("vit", "EkfacInfluence"),
                                            ("vit", "KfacInfluence")])
def test_defaults_leave_out_normalisation_and_bare_parameters_in_one_line(family, solver):
    """The line names the uncaptured types; what is left is the captured layers' parameters, scored
    exactly as when they are selected by name (tests/test_hf_models.py has K-FAC on the ResNet)."""
    model, loss, data = build(family)
    cls = getattr(tfl, solver)
    with pytest.warns(UserWarning) as record:
        im = cls(model, loss, REG, fisher="empirical")
    lines = [str(w.message) for w in record if "covers" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(solver) and LEFT_OUT[family] in lines[0], lines[0]
    names = captured_names(model, family)
    assert im.functions.names == names
    x, y = data(10, seed=21)
    by_name = cls(model, loss, REG, fisher="empirical", params=names).fit((x, y))
    # The same float64 computation on the same parameters.
    torch.testing.assert_close(im.fit((x, y)).influences(x[:2], y[:2], x, y),
                               by_name.influences(x[:2], y[:2], x, y), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bare", ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings"])
def test_ekfac_refuses_vits_bare_parameters_when_params_names_them(bare):
    model, loss, _ = build("vit")
    with pytest.raises(ValueError, match=rf"not covered: {bare} \(ViTEmbeddings: type not registered\)\."):
        tfl.EkfacInfluence(model, loss, REG, params=[bare, "classifier.weight"])


@pytest.mark.parametrize("family, size", [("resnet", 16), ("resnet", 8), ("vit", 16)])
def test_ekfac_equals_its_formula_on_convolutions_and_patch_embeddings(family, size):
    """Eigenvalues = E[(Q_S^T G Q_A)^2] per layer, G each sample's (d_out, c_in * kh * kw [+ 1]) gradient:
    the ResNet's stem, 3x3, strided and 1x1 shortcut convolutions (no bias) between BatchNorms, ViT's
    patch embedding (a stride-4 convolution with bias) and its Linear layers over 17 tokens. At 8 x 8
    images the ResNet's last 3x3 convolution sees 1 x 1 maps: its padding taps are always zero."""
    model, loss, data = build(family)
    x, y = data(12, seed=22)
    xt, yt = data(3, seed=23)
    x, xt = x[..., :size, :size], xt[..., :size, :size]
    names = captured_names(model, family)
    im = tfl.EkfacInfluence(model, loss, REG, fisher="empirical", params=names).fit((x, y))
    train = layer_blocks(model, reference_grads(model, loss, x, y, names), names)
    test = layer_blocks(model, reference_grads(model, loss, xt, yt, names), names)
    assert set(train) == set(im.factors) and len(train) == {"resnet": 7, "vit": 14}[family]
    expected = torch.zeros(3, 12, dtype=torch.float64)
    for name, f in im.factors.items():
        q_s, q_a = f.gradient_eigenvectors, f.activation_eigenvectors
        rotated = q_s.T @ train[name] @ q_a
        # Both sides: the mean of squares of the same float64 rotations, summed in another order.
        torch.testing.assert_close(f.eigenvalues, rotated.square().mean(dim=0), rtol=1e-9, atol=1e-15)
        expected += torch.einsum("qoi,noi->qn", (q_s.T @ test[name] @ q_a) / (f.eigenvalues + REG), rotated)
    torch.testing.assert_close(im.influences(xt, yt, x, y), expected, rtol=1e-9, atol=1e-12)
    if size == 8:  # the 8 padding taps of each of 16 channels (and dead channels): eigenvalue 0 exactly
        last = im.factors["resnet.encoder.stages.1.layers.0.layer.1.convolution"]
        assert int((last.eigenvalues == 0).all(dim=0).sum()) >= 8 * 16


def test_covariance_eigendecomposition_keeps_always_zero_coordinates_as_they_are():
    """K-FAC's factor eigendecomposition: rows and columns that are exactly zero are eigenvectors with
    eigenvalue 0; the rest is decomposed alone (LAPACK can fail to converge on the whole)."""
    from torchfluence._covariance_eigh import covariance_eigh

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 9, generator=g, dtype=torch.float64)
    a[:, [0, 3, 8]] = 0
    cov = a.T @ a / 40
    values, vectors = covariance_eigh(cov)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(cov), rtol=1e-12, atol=1e-14)
    assert bool((values.diff() >= 0).all()) and int((values == 0).sum()) == 3
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, cov, rtol=0, atol=1e-14)
    assert sorted(vectors[:, values == 0].abs().argmax(dim=0).tolist()) == [0, 3, 8]
    full = torch.linalg.eigh(cov + torch.eye(9, dtype=torch.float64))  # no zero rows: eigh itself
    for got, expected in zip(covariance_eigh(cov + torch.eye(9, dtype=torch.float64)), full):
        assert torch.equal(got, expected)


# The solvers that tests/test_hf_models.py does not run on every model, with their defaults except
# LiSSA's maxiter (1000 Gauss-Newton products take a minute here; 20 check that it runs and stays finite).
MORE_SOLVERS = {
    "lissa": lambda m, loss: tfl.LissaInfluence(m, loss, REG, second_order="gauss_newton", maxiter=20),
    "nystroem": lambda m, loss: tfl.NystroemSketchInfluence(m, loss, REG, second_order="gauss_newton"),
    "datainf": lambda m, loss: tfl.InverseHarmonicMeanInfluence(m, loss, REG),
}


@pytest.mark.parametrize("solver", list(MORE_SOLVERS))
@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_the_other_solvers_run_on_vision_models(family, solver):
    check_solver_runs(family, MORE_SOLVERS[solver])


def test_direct_hessian_through_batchnorm_equals_a_dense_inverse():
    """Double backward through eval-mode BatchNorm: a subset with BatchNorm scales and shifts, a 1x1
    strided shortcut convolution and the classifier's bias, against a dense float64 inverse."""
    model, loss, data = build("resnet")
    subset = ["resnet.encoder.stages.1.layers.0.shortcut.convolution.weight",
              "resnet.encoder.stages.1.layers.0.shortcut.normalization.weight",
              "resnet.encoder.stages.0.layers.0.layer.0.normalization.bias", "classifier.1.bias"]
    x, y = data(8, seed=26)
    xt, yt = data(2, seed=27)
    reg = 5.0  # above the indefinite Hessian's most negative eigenvalue on this random model
    im = tfl.DirectInfluence(model, loss, reg, params=subset).fit((x, y))
    h = reference_hessian(model, loss, x, y, subset)
    assert float(torch.linalg.eigvalsh(h)[0]) + reg > 0.1
    g, gt = reference_grads(model, loss, x, y, subset), reference_grads(model, loss, xt, yt, subset)
    expected = torch.linalg.solve(h + reg * torch.eye(h.shape[0], dtype=torch.float64), gt.T).T @ g.T
    torch.testing.assert_close(im.influences(xt, yt, x, y), expected, rtol=1e-7, atol=1e-10)


def test_a_resnet_left_in_training_mode_is_warned_about():
    model, loss, _ = build("resnet")
    with pytest.warns(UserWarning, match=r"in training mode and has dropout or batch-norm .*model.eval\(\)"):
        tfl.GradientSimilarity(model.train(), loss)


def test_cg_with_an_ekfac_preconditioner_on_a_batchnorm_resnet():
    """The EK-FAC preconditioner covers the convolutions; BatchNorm's parameters get 1 / lambda. CG then
    converges to the unpreconditioned solution."""
    model, loss, data = build("resnet")
    x, y = data(16, seed=28)
    xt, yt = data(3, seed=29)
    plain = tfl.CgInfluence(model, loss, REG, second_order="gauss_newton").fit((x, y))
    im = tfl.CgInfluence(model, loss, REG, second_order="gauss_newton", preconditioner="ekfac").fit((x, y))
    torch.testing.assert_close(im.influences(xt, yt, x, y), plain.influences(xt, yt, x, y),
                               rtol=1e-4, atol=1e-8)
