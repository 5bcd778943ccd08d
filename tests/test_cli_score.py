"""`torchfluence score`: the command run in-process on a tiny CNN, image folders and tensor files."""

import json
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchfluence as tfl  # noqa: E402
from PIL import Image  # noqa: E402
from torchfluence.cli import main  # noqa: E402

TINYNET = """
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 2))
"""

CLASSES = ["cat", "dog"]
REG = 1e-3


def _build():
    namespace = {}
    exec(TINYNET, namespace)
    return namespace["build"]()


def _write_folder(root, per_class, seed, size=8):
    """Class sub-folders of RGB PNGs; returns the expected (x, y) in ImageFolder order."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            if label:  # make the classes differ a little
                pixels[:, :, 0] = pixels[:, :, 0] // 2 + 128
            Image.fromarray(pixels).save(root / name / f"img{i:02d}.png")
            xs.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0)
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    (root / "tinynet.py").write_text(TINYNET)
    torch.manual_seed(0)
    model = _build()
    torch.save(model.state_dict(), root / "weights.pt")
    x_train, y_train = _write_folder(root / "train", 6, seed=1)
    x_test, y_test = _write_folder(root / "test", 2, seed=2)
    torch.save({"x": x_train, "y": y_train}, root / "train.pt")
    torch.save((x_test, y_test), root / "test.pt")
    return {"root": root, "model": model, "train": (x_train, y_train), "test": (x_test, y_test)}


def _args(setup, out, *extra, train="train", test="test", model=None, weights=None):
    root = setup["root"]
    return ["score", "--model", model or f"{root / 'tinynet.py'}:build",
            "--weights", str(weights or root / "weights.pt"), "--train", str(root / train),
            "--test", str(root / test), "--out", str(out), "--regularization", str(REG), *extra]


def _direct(cls, setup, k, **kwargs):
    model = _build()
    model.load_state_dict(setup["model"].state_dict())
    model.eval()
    im = cls(model, F.cross_entropy, REG, **kwargs).fit(setup["train"])
    return im.influences(*setup["test"], *setup["train"]), im.top_k(*setup["test"], k=k)


def test_ekfac_on_image_folders(setup, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(_args(setup, out, "--solver", "ekfac", "--top-k", "3", "--batch-size", "5")) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed

    scores = np.load(out / "influences.npy")
    assert scores.shape == (4, 12) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    # The same blocks of 5 as the CLI: float32 covariances summed in other groupings differ by
    # up to 3e-4 relative after the eigendecomposition (one block of 12 against a float64 fit).
    expected, top = _direct(tfl.EkfacInfluence, setup, k=3, block_size=5)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-5 * np.abs(scores).max())

    top_json = json.loads((out / "top_k.json").read_text())
    assert top_json["k"] == 3 and top_json["classes"] == CLASSES
    assert [p["index"] for p in top_json["test"]] == [0, 1, 2, 3]
    assert [p["label"] for p in top_json["test"]] == [0, 0, 1, 1]
    assert [[r["index"] for r in p["helpful"]] for p in top_json["test"]] == top.helpful_indices.tolist()
    assert [[r["index"] for r in p["harmful"]] for p in top_json["test"]] == top.harmful_indices.tolist()
    first = top_json["test"][0]["helpful"][0]
    assert first["path"].endswith(f"img{first['index'] % 6:02d}.png")
    assert first["class"] == CLASSES[first["index"] // 6]
    assert first["score"] == pytest.approx(float(scores[0, first["index"]]), rel=1e-4, abs=1e-6)
    assert top_json["test"][2]["path"].endswith("dog/img00.png")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["solver"] == "ekfac" and summary["n_train"] == 12 and summary["n_test"] == 4
    assert summary["torchfluence_version"] == tfl.__version__
    assert summary["settings"]["regularization"] == REG and summary["settings"]["batch_size"] == 5
    assert {"fit", "influences", "top_k", "plots"} <= set(summary["timings_s"])

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "average_influence_by_label.png" in pngs and "influence_by_label_test0.png" in pngs
    assert {"top_images_test0.png", "top_images_test1.png", "top_images_test2.png"} <= set(pngs)
    report = (out / "report.html").read_text()
    for name in pngs:
        assert f"src='{name}'" in report
    assert "dog/img00.png" in report


def test_direct_on_tensor_files_with_module_spec(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(setup["root"]))
    out = tmp_path / "results"
    try:
        code = main(_args(setup, out, "--solver", "direct", "--top-k", "2", "--no-plots",
                          train="train.pt", test="test.pt", model="tinynet:build"))
    finally:
        sys.modules.pop("tinynet", None)
    assert code == 0, capsys.readouterr().err
    scores = np.load(out / "influences.npy")
    expected, top = _direct(tfl.DirectInfluence, setup, k=2, second_order="gauss_newton")
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-5 * np.abs(scores).max())
    top_json = json.loads((out / "top_k.json").read_text())
    assert [[r["index"] for r in p["helpful"]] for p in top_json["test"]] == top.helpful_indices.tolist()
    assert "path" not in top_json["test"][0] and top_json["classes"] is None
    assert not list(out.glob("*.png"))
    assert "<table>" in (out / "report.html").read_text()


def _expect_error(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchfluence score: error: ")
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_bad_model_and_weights(setup, tmp_path, capsys):
    root, out = setup["root"], tmp_path / "out"
    _expect_error(capsys, _args(setup, out, weights=root / "missing.pt"), "--weights", "missing.pt")
    _expect_error(capsys, _args(setup, out, model="tinynet"), "--model")
    _expect_error(capsys, _args(setup, out, model="no_such_module_for_score:build"), "--model",
                  "no_such_module_for_score")
    _expect_error(capsys, _args(setup, out, model=f"{root / 'tinynet.py'}:nothing"), "--model", "nothing")
    _expect_error(capsys, _args(setup, out, model=f"{root / 'absent.py'}:build"), "--model", "absent.py")
    torch.save(_build(), root / "pickled_model.pt")  # a whole pickled module is refused, not unpickled
    _expect_error(capsys, _args(setup, out, weights=root / "pickled_model.pt"), "--weights", "weights_only")
    wrong = torch.nn.Linear(3, 2).state_dict()
    torch.save(wrong, root / "wrong.pt")
    _expect_error(capsys, _args(setup, out, weights=root / "wrong.pt"), "--weights", "does not match")


def test_bad_data(setup, tmp_path, capsys):
    root, out = setup["root"], tmp_path / "out"
    (root / "empty").mkdir(exist_ok=True)
    _expect_error(capsys, _args(setup, out, train="empty"), "--train", "no class sub-folders")
    (root / "no_images" / "cat").mkdir(parents=True, exist_ok=True)
    _expect_error(capsys, _args(setup, out, train="no_images"), "--train", "no images")
    _expect_error(capsys, _args(setup, out, test="nowhere"), "--test", "nowhere")
    x, y = setup["train"]
    torch.save({"x": x, "y": y[:-1]}, root / "short.pt")
    _expect_error(capsys, _args(setup, out, train="short.pt", test="test.pt"), "--train", "different lengths")
    torch.save({"x": x}, root / "no_y.pt")
    _expect_error(capsys, _args(setup, out, train="no_y.pt", test="test.pt"), "--train", "'y'")
    _expect_error(capsys, _args(setup, out, "--top-k", "13"), "--top-k", "12")
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(root / "test" / "cat" / "odd.png")
    try:
        _expect_error(capsys, _args(setup, out), "--test", "--image-size", "odd.png")
    finally:
        (root / "test" / "cat" / "odd.png").unlink()
    assert not (out / "influences.npy").exists()


def test_image_size_resizes(setup, tmp_path, capsys):
    root, out = setup["root"], tmp_path / "resized"
    _write_folder(root / "big_train", 2, seed=3, size=12)
    _write_folder(root / "big_test", 1, seed=4, size=16)
    argv = _args(setup, out, "--solver", "direct", "--top-k", "1", "--no-plots", "--image-size", "8",
                 train="big_train", test="big_test")
    assert main(argv) == 0, capsys.readouterr().err
    assert np.load(out / "influences.npy").shape == (2, 4)
    assert json.loads((out / "summary.json").read_text())["input_shape"] == [3, 8, 8]


def test_argparse_errors_exit_2(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_args(setup, tmp_path, "--solver", "newton"))
    assert exc.value.code == 2
    assert "--solver" in capsys.readouterr().err
