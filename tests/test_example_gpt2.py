"""examples/gpt2_synthetic.py runs end to end: a GPT-2 on dict batches, top-k and per-token scores."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
EXAMPLE = Path(__file__).parent.parent / "examples" / "gpt2_synthetic.py"


def test_gpt2_example_ranks_sequences_of_the_querys_step_first():
    spec = importlib.util.spec_from_file_location("gpt2_synthetic", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.run(n_train=128, n_query=4, steps=120, k=5)
    assert len(result["coverage"]) == 1 and "Conv1D" in result["coverage"][0]
    # A quarter of the training sequences share a query's step: a random ranking gets ~25%.
    assert float(result["same_step"].mean()) >= 0.5
    per_token = result["per_token"]
    assert per_token.shape == (example.LENGTH,) and torch.isfinite(per_token).all()
    # float32 model: the same terms summed before or after the contraction over positions.
    assert abs(float(per_token.sum()) - result["influence"]) <= 1e-4 * abs(result["influence"])
