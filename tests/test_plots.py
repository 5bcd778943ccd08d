"""torchfluence.plots: figure content, input checks and saving (Agg backend)."""

import re

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torchfluence import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _title_indices(axes, kind):
    """Training indices in the titles of the image panels of one kind, in rank order."""
    found = []
    for ax in axes:
        m = re.match(rf"{kind} (\d+): #(\d+)", ax.get_title())
        if m:
            found.append((int(m.group(1)), int(m.group(2))))
    return [idx for _, idx in sorted(found)]


def _expected_top(values, k, largest):
    keyed = sorted(range(len(values)), key=lambda i: ((-values[i] if largest else values[i]), i))
    return keyed[:k]


# ----------------------------------------------------------------------------- histograms

def test_distribution_single():
    ax = plots.plot_influence_distribution(torch.randn(200), "test point 3", bins=20)
    assert isinstance(ax, matplotlib.axes.Axes)
    assert len(ax.patches) == 20
    assert sum(p.get_height() for p in ax.patches) == 200
    assert "test point 3" in ax.get_title()


@pytest.mark.parametrize("as_numpy", [False, True])
def test_distribution_by_label(as_numpy):
    infl = torch.randn(300, dtype=torch.float64)
    labels = torch.arange(300) % 3
    if as_numpy:
        infl, labels = infl.numpy(), labels.numpy()
    ax = plots.plot_influence_distribution_by_label(infl, labels, "(label 1)", bins=15)
    assert len(ax.figure.axes) == 1
    assert len(ax.patches) == 3 * 15
    assert sum(p.get_height() for p in ax.patches) == 300
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]
    assert ax.get_title().endswith("(label 1)")


def test_distribution_by_label_names_and_given_ax():
    fig, (left, right) = plt.subplots(1, 2)
    infl = torch.randn(50)
    labels = torch.tensor([0, 1] * 25)
    ax = plots.plot_influence_distribution_by_label(infl, labels, ax=right, label_names=["cat", "dog"])
    assert ax is right and len(fig.axes) == 2 and not left.patches
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cat", "dog"]
    ax = plots.plot_influence_distribution_by_label(infl, labels, ax=left, label_names={0: "a", 1: "b"})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    with pytest.raises(ValueError, match="label_names has no entry for label 1"):
        plots.plot_influence_distribution_by_label(infl, labels, label_names=["cat"])


def test_distribution_string_labels():
    labels = np.array(["b", "a", "b", "a", "c", "c"])
    ax = plots.plot_influence_distribution_by_label(np.arange(6.0), labels)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]


def test_average_by_label():
    matrix = torch.randn(7, 40)
    labels = torch.arange(40) % 2
    ax = plots.plot_average_influence_by_label(matrix, labels, bins=10)
    assert "averaged over 7 test points" in ax.get_title()
    assert len(ax.patches) == 20
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1"]
    # Same histograms as for the mean passed directly.
    direct = plots.plot_influence_distribution_by_label(matrix.mean(0), labels, bins=10)
    assert [p.get_height() for p in ax.patches] == [p.get_height() for p in direct.patches]


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("shape", [(30, 1, 6, 6), (30, 3, 5, 4), (30, 8, 8)])
def test_top_training_images(shape):
    images = torch.randn(shape) * 50 + 7  # any value range
    infl = torch.randn(30)
    infl[4] = infl[9] = infl[20] = 10.0  # ties at the top: lower index first
    infl[2] = infl[3] = -10.0
    labels = torch.arange(30) % 4
    test = images[0]
    fig = plots.plot_top_training_images(images, infl, labels, k=4, test_image=test,
                                         test_label=torch.tensor(2))
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == 1 + 2 * 4
    assert fig.axes[0].get_title() == "test point\nlabel 2"
    values = infl.tolist()
    helpful = _title_indices(fig.axes, "helpful")
    harmful = _title_indices(fig.axes, "harmful")
    assert helpful == _expected_top(values, 4, True) and helpful[:3] == [4, 9, 20]
    assert harmful == _expected_top(values, 4, False) and harmful[:2] == [2, 3]
    for ax in fig.axes[1:]:
        idx = int(re.search(r"#(\d+)", ax.get_title()).group(1))
        assert f"label {idx % 4}" in ax.get_title()
        assert f"{values[idx]:.3g}" in ax.get_title()
        data = ax.images[0].get_array()
        assert data.min() >= 0 and data.max() <= 1  # normalised per image
        rgb = len(shape) == 4 and shape[1] == 3
        assert data.shape == ((shape[-2], shape[-1], 3) if rgb else shape[-2:])


def test_top_training_images_no_test_flipped_and_names():
    infl = np.linspace(-1, 1, 10)
    flipped = np.zeros(10, dtype=bool)
    flipped[9] = True
    fig = plots.plot_top_training_images(np.random.rand(10, 4, 4), infl, np.arange(10) % 2, k=2,
                                         flipped=flipped, label_names=["even", "odd"])
    assert len(fig.axes) == 4
    assert _title_indices(fig.axes, "helpful") == [9, 8]
    assert _title_indices(fig.axes, "harmful") == [0, 1]
    titles = [ax.get_title() for ax in fig.axes]
    assert "label odd (flipped)" in titles[0]
    assert sum("flipped" in t for t in titles) == 1


def test_constant_image_is_shown():
    fig = plots.plot_top_training_images(torch.zeros(3, 1, 2, 2), torch.tensor([1.0, 2.0, 3.0]),
                                         torch.zeros(3), k=1)
    assert np.allclose(fig.axes[0].images[0].get_array(), 0.5)


def test_top_images_per_class():
    n, k = 40, 3
    infl = torch.randn(n)
    labels = torch.arange(n) % 3
    labels[torch.arange(n) % 3 == 2] = 5  # class 5: 13 members
    labels[:2] = 7  # class 7: two members, fewer than k
    fig = plots.plot_top_images_per_class(torch.rand(n, 3, 4, 4), infl, labels, k=k)
    classes = [0, 1, 5, 7]
    counts = [min(k, int((labels == c).sum())) for c in classes]
    assert len(fig.axes) == 2 * sum(counts)
    values = infl.tolist()
    for c in classes:
        members = [i for i in range(n) if int(labels[i]) == c]
        mine = [ax for ax in fig.axes if f"label {c}\n" in ax.get_title()]
        kk = min(k, len(members))
        assert len(mine) == 2 * kk
        sub = [values[i] for i in members]
        assert _title_indices(mine, "most") == [members[j] for j in _expected_top(sub, kk, True)]
        assert _title_indices(mine, "least") == [members[j] for j in _expected_top(sub, kk, False)]


# ----------------------------------------------------------------------------- self-influence

def test_self_influence_vs_loss():
    si, loss = torch.rand(50), torch.rand(50)
    flipped = torch.zeros(50, dtype=torch.bool)
    flipped[[3, 17, 40]] = True
    ax = plots.plot_self_influence_vs_loss(si, loss, flipped)
    assert len(ax.collections) == 2
    clean, bad = ax.collections
    keep = ~flipped
    np.testing.assert_allclose(clean.get_offsets(), np.stack([loss[keep], si[keep]], 1), rtol=1e-6)
    np.testing.assert_allclose(bad.get_offsets(), np.stack([loss[flipped], si[flipped]], 1), rtol=1e-6)
    assert not np.allclose(clean.get_facecolor()[0], bad.get_facecolor()[0])
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["label kept (47)", "label flipped (3)"]
    assert ax.get_xlabel() == "training loss" and ax.get_ylabel() == "self-influence"


def test_self_influence_vs_loss_without_mask():
    si, loss = np.arange(5.0), np.arange(5.0) ** 2
    ax = plots.plot_self_influence_vs_loss(si, loss, yscale="symlog")
    assert len(ax.collections) == 1 and ax.get_legend() is None
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.stack([loss, si], 1))
    assert ax.get_yscale() == "symlog"


def test_bfloat16_tensors():
    si, loss = torch.rand(5, dtype=torch.bfloat16), torch.rand(5, dtype=torch.float16)
    ax = plots.plot_self_influence_vs_loss(si, loss)
    assert len(ax.collections[0].get_offsets()) == 5


# ----------------------------------------------------------------------------- bad input

def test_bad_shapes():
    with pytest.raises(ValueError, match=re.escape("influences must be 1-D (n_train,), got shape (3, 4)")):
        plots.plot_influence_distribution_by_label(torch.zeros(3, 4), torch.zeros(3))
    msg = re.escape("labels must have the same length as influences (5), got 4")
    with pytest.raises(ValueError, match=msg):
        plots.plot_influence_distribution_by_label(torch.zeros(5), torch.zeros(4))
    msg = re.escape("influence_matrix must be 2-D (n_test, n_train), got shape (5,)")
    with pytest.raises(ValueError, match=msg):
        plots.plot_average_influence_by_label(torch.zeros(5), torch.zeros(5))
    msg = "train_labels must have one entry per column of influence_matrix \\(5\\), got 3"
    with pytest.raises(ValueError, match=msg):
        plots.plot_average_influence_by_label(torch.zeros(2, 5), torch.zeros(3))
    msg = re.escape("images must be (n, C, H, W) with C in {1, 3} or (n, H, W), got shape (4, 2, 3, 3)")
    with pytest.raises(ValueError, match=msg):
        plots.plot_top_training_images(torch.zeros(4, 2, 3, 3), torch.zeros(4), torch.zeros(4), k=1)
    msg = re.escape("images must have the same length as influences (4), got 5")
    with pytest.raises(ValueError, match=msg):
        plots.plot_top_training_images(torch.zeros(5, 3, 3), torch.zeros(4), torch.zeros(4), k=1)
    msg = re.escape("test_image must be (C, H, W) with C in {1, 3} or (H, W), got shape (1, 1, 3, 3)")
    with pytest.raises(ValueError, match=msg):
        plots.plot_top_training_images(torch.zeros(4, 3, 3), torch.zeros(4), torch.zeros(4), k=1,
                                       test_image=torch.zeros(1, 1, 3, 3))
    msg = re.escape("losses must have the same length as self_influence (3), got 2")
    with pytest.raises(ValueError, match=msg):
        plots.plot_self_influence_vs_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="influences must not be empty"):
        plots.plot_influence_distribution(torch.zeros(0))


def test_bad_k_and_mask():
    images, infl, labels = torch.zeros(4, 3, 3), torch.zeros(4), torch.zeros(4)
    msg = re.escape("k must be at most the number of training points (4), got 5")
    with pytest.raises(ValueError, match=msg):
        plots.plot_top_training_images(images, infl, labels, k=5)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        plots.plot_top_images_per_class(images, infl, labels, k=0)
    with pytest.raises(TypeError, match="flipped must be a boolean mask, got dtype int64"):
        plots.plot_self_influence_vs_loss(infl, infl, torch.zeros(4, dtype=torch.int64))
    msg = re.escape("flipped must have the same length as self_influence (4), got 3")
    with pytest.raises(ValueError, match=msg):
        plots.plot_self_influence_vs_loss(infl, infl, torch.zeros(3, dtype=torch.bool))


def test_non_finite():
    bad = torch.zeros(6)
    bad[4] = float("nan")
    with pytest.raises(ValueError, match="influences must be finite, got nan at index 4"):
        plots.plot_influence_distribution(bad)
    with pytest.raises(ValueError, match="self_influence must be finite, got nan at index 4"):
        plots.plot_self_influence_vs_loss(bad, torch.zeros(6))
    inf = torch.zeros(6)
    inf[2] = float("inf")
    with pytest.raises(ValueError, match="losses must be finite, got inf at index 2"):
        plots.plot_self_influence_vs_loss(torch.zeros(6), inf)
    matrix = torch.zeros(2, 3)
    matrix[1, 2] = float("-inf")
    msg = re.escape("influence_matrix must be finite, got -inf at index (1, 2)")
    with pytest.raises(ValueError, match=msg):
        plots.plot_average_influence_by_label(matrix, torch.zeros(3))
    images = torch.zeros(6, 2, 2)
    images[5, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape("images must be finite, got nan at index (5, 0, 1, 0)")):
        plots.plot_top_training_images(images, torch.zeros(6), torch.zeros(6), k=1)


# ----------------------------------------------------------------------------- saving, import

def test_save_png(tmp_path):
    n = 24
    images, infl, labels = torch.rand(n, 1, 8, 8), torch.randn(n), torch.arange(n) % 2
    outputs = {
        "hist.png": plots.plot_influence_distribution_by_label(infl, labels).figure,
        "avg.png": plots.plot_average_influence_by_label(torch.randn(3, n), labels).figure,
        "top.png": plots.plot_top_training_images(images, infl, labels, k=3, test_image=images[0]),
        "per_class.png": plots.plot_top_images_per_class(images, infl, labels, k=2),
        "scatter.png": plots.plot_self_influence_vs_loss(infl.abs(), infl.abs(), labels == 1).figure,
    }
    for name, fig in outputs.items():
        fig.savefig(tmp_path / name, dpi=50)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_never_shows(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("plt.show() called")

    monkeypatch.setattr(plt, "show", fail)
    plots.plot_influence_distribution(torch.randn(10))
    plots.plot_top_training_images(torch.rand(5, 2, 2), torch.randn(5), torch.zeros(5), k=1)


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys; from torchfluence import plots; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
