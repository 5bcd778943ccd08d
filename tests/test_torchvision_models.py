"""torchvision's and timm's ResNet-18 (random weights, 10 classes) through EK-FAC and CG, where they import,
and examples/_resnet18.py's copy of torchvision's layout (same module names and shapes) everywhere.

Each case skips, saying why, where its package is not installed or does not load with this torch:
torchvision's wheels are built for one torch version and build (a CUDA torchvision next to a CPU
torch fails at import with "operator torchvision::nms does not exist"), and timm imports torchvision.
The full ResNet-18's EK-FAC fit eigendecomposes 4608 x 4608 factors, minutes on a CPU: the default
selection is checked at construction, and the fits run on a few layers' parameters.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl

from tests.examples import load_example


def _import(name: str):
    try:
        return pytest.importorskip(name)
    except RuntimeError as err:  # a wheel built for another torch
        if "torchvision::nms does not exist" not in str(err):
            raise
        pytest.skip(f"{name} does not load with torch {torch.__version__} (built for another torch): {err}")


MODELS = {
    "torchvision": lambda: _import("torchvision.models").resnet18(weights=None, num_classes=10),
    "timm": lambda: _import("timm").create_model("resnet18", pretrained=False, num_classes=10),
    "torchvision_layout": lambda: load_example("_resnet18").ResNet18(num_classes=10),
}
# Parameters of a few layers: a 3x3 convolution, the strided 1x1 shortcut (with its BatchNorm for CG) and fc.
EKFAC_PARAMS = ["layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.weight", "fc.bias"]
CG_PARAMS = ["layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer2.0.downsample.1.weight", "layer4.1.bn2.bias",
             "fc.bias"]


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(params=list(MODELS))
def resnet18(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


def test_ekfac_on_resnet18(resnet18):
    with pytest.warns(UserWarning) as record:
        tfl.EkfacInfluence(resnet18, F.cross_entropy, 1e-3)
    lines = [str(w.message) for w in record if "covers" in str(w.message)]
    assert len(lines) == 1
    assert lines[0].startswith("EkfacInfluence covers 21 captured layers (Conv2d, Linear; 11,172,042 values) "
                               "and leaves out 9,600 values: BatchNorm2d (not a captured layer type): "
                               "40 parameter(s)")
    x, y = images(12, seed=1)
    im = tfl.EkfacInfluence(resnet18, F.cross_entropy, 1e-3, params=EKFAC_PARAMS).fit((x, y))
    assert set(im.factors) == {"layer1.0.conv1", "layer2.0.downsample.0", "fc"}
    scores = im.influences(x[:3], y[:3], x, y)
    assert scores.shape == (3, 12) and bool(torch.isfinite(scores).all())
    top = im.top_k(x[:3], y[:3], k=4)
    torch.testing.assert_close(top.helpful_values, scores.topk(4, dim=1).values)
    # A training image is its own most helpful one: g^T (F + lambda I)^-1 g is the largest of its row here.
    assert top.helpful_indices[:, 0].tolist() == [0, 1, 2]


def test_cg_on_resnet18_through_batchnorm_equals_direct(resnet18):
    x, y = images(12, seed=2)
    xt, yt = images(2, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # CG converges: no warning
        cg = tfl.CgInfluence(resnet18, F.cross_entropy, 1e-2, second_order="gauss_newton", params=CG_PARAMS)
        scores = cg.fit((x, y)).influences(xt, yt, x, y)
    assert scores.shape == (2, 12) and bool(torch.isfinite(scores).all())
    direct = tfl.DirectInfluence(resnet18, F.cross_entropy, 1e-2, second_order="gauss_newton",
                                 params=CG_PARAMS)
    expected = direct.fit((x, y)).influences(xt, yt, x, y)
    torch.testing.assert_close(scores, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
