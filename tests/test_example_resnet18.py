"""The ResNet-18 examples run end to end: examples/resnet18_two_classes.py (the pyDVL notebook's workflow)
finds flipped labels; examples/resnet18_image_folder.py (a Hugging Face ResNet-18 on an image folder,
EK-FAC, top-k) ranks each query's copy in the training folder first."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.examples import load_example


def test_resnet18_example_runs_and_ranks_flipped_labels_first(tmp_path):
    example = load_example("resnet18_two_classes")
    result = example.run(out_dir=str(tmp_path), epochs=60)
    assert result["accuracy"] > 0.8
    n_test, n_train = result["influences"].shape
    assert n_train == len(result["is_flipped"]) and n_test > 0
    assert torch.isfinite(result["influences"]).all()
    for path in result["figures"].values():
        assert path.exists() and path.stat().st_size > 1000
    assert (tmp_path / "detection.md").read_text().count("|\n") >= 4
    # Flipped labels are 10% of the data: a random ranking puts ~2.6 of 26 in its top 10%;
    # both influence rankings put more than half of them there.
    flipped = result["is_flipped"]
    top = int(0.1 * len(flipped))
    for name, order in result["rankings"].items():
        if "influence" in name:
            assert int(flipped[order[:top]].sum()) > flipped.sum() // 2, name


# A run at test size: 4 classes x 24 images of 16 x 16, the ResNet-18 at width 8 (64 is the real one).
SMALL = dict(per_class=24, classes=4, size=16, width=8, epochs=2, queries_per_class=2, duplicates=4, k=5)


def test_resnet18_image_folder_example_ranks_each_querys_copy_first(tmp_path):
    pytest.importorskip("transformers")
    example = load_example("resnet18_image_folder")
    result = example.run(**SMALL, root=str(tmp_path))
    # One coverage line: the convolutions and the classifier are covered, BatchNorm is left out.
    assert len(result["coverage"]) == 1
    assert result["coverage"][0].startswith("EkfacInfluence covers 21 captured layers (Conv2d, Linear; ")
    assert "BatchNorm2d (not a captured layer type): 40 parameter(s)" in result["coverage"][0]
    n_query, n_train, k = result["n_query"], result["n_train"], SMALL["k"]
    assert (n_query, n_train) == (8, 4 * 24 + 4)
    top = result["top"]
    assert top.scores.shape == (n_query, n_train) and bool(torch.isfinite(top.scores).all())
    for values, indices in [(top.helpful_values, top.helpful_indices),
                            (top.harmful_values, top.harmful_indices)]:
        assert values.shape == indices.shape == (n_query, k)
        assert int(indices.min()) >= 0 and int(indices.max()) < n_train
        assert all(len(set(row)) == k for row in indices.tolist())
        torch.testing.assert_close(values, top.scores.gather(1, indices), rtol=0, atol=0)
    torch.testing.assert_close(top.helpful_values, top.scores.topk(k, dim=1).values, rtol=0, atol=0)
    smallest = top.scores.topk(k, dim=1, largest=False).values
    torch.testing.assert_close(top.harmful_values, smallest, rtol=0, atol=0)
    # The copies sit in their query's class folder; each is its query's most helpful training image.
    assert len(result["copy_index"]) == 4
    for q, j in result["copy_index"].items():
        assert int(result["train_labels"][j]) == int(result["query_labels"][q])
        assert result["copy_rank"][q] == 1, (q, result["copy_rank"])
    # The images of a class look alike: a random ranking puts a quarter of the top k in the query's class.
    assert float(result["same_class"].mean()) >= 0.5


def test_the_image_folder_reads_back_what_was_written(tmp_path, monkeypatch):
    """PNG files written and read with PIL, or with zlib alone where PIL does not import, hold the
    synthetic pixels exactly; the Dataset lists classes and files in ImageFolder's order."""
    pytest.importorskip("transformers")
    example = load_example("resnet18_image_folder")
    rng = np.random.default_rng(5)
    expected = [example.synthetic_image(c, 3, 8, rng) for c in range(3) for _ in range(2)]
    pil = pytest.importorskip("PIL.Image")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` raises ImportError
        example.write_image_folder(tmp_path / "zlib", n_classes=3, per_class=2, size=8, seed=5)
        without_pil = example.ImageFolderDataset(tmp_path / "zlib")
        items = [without_pil[i] for i in range(len(without_pil))]
    example.write_image_folder(tmp_path / "pil", n_classes=3, per_class=2, size=8, seed=5)
    with_pil = example.ImageFolderDataset(tmp_path / "pil")
    for dataset in (without_pil, with_pil):
        assert dataset.classes == ["class_0", "class_1", "class_2"] and dataset.targets == [0, 0, 1, 1, 2, 2]
        assert [Path(p).name for p, _ in dataset.samples] == ["00000.png", "00001.png"] * 3
    for i, pixels in enumerate(expected):
        assert [label for _, label in (items[i], with_pil[i])] == [i // 2] * 2
        torch.testing.assert_close(items[i][0], example.to_tensor(pixels), rtol=0, atol=0)
        torch.testing.assert_close(with_pil[i][0], example.to_tensor(pixels), rtol=0, atol=0)
        # The zlib files are valid PNGs: PIL reads the same pixels from them.
        assert np.array_equal(np.asarray(pil.open(without_pil.samples[i][0]).convert("RGB")), pixels)
