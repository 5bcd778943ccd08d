"""examples/resnet18_two_classes.py, the pyDVL notebook's workflow, runs end to end and finds flipped labels."""

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).parent.parent / "examples" / "resnet18_two_classes.py"


def _load():
    spec = importlib.util.spec_from_file_location("resnet18_two_classes", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resnet18_example_runs_and_ranks_flipped_labels_first(tmp_path):
    example = _load()
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
