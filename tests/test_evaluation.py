"""The linear datamodeling score and the subset retraining loop, against plain float64 references."""

import math
import os
import warnings

import pytest
import torch
import torchfluence as tfl
from torchfluence.evaluation import lds, retrain_subsets

try:
    import scipy.stats as scipy_stats
except ImportError:  # optional second oracle
    scipy_stats = None


# -- references -------------------------------------------------------------------------------------

def naive_average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the positions they occupy, by counting (O(m^2))."""
    ranks = []
    for v in values:
        smaller = sum(1 for w in values if w < v)
        equal = sum(1 for w in values if w == v)
        ranks.append(smaller + (equal + 1) / 2)
    return ranks


def naive_spearman(a: list[float], b: list[float]) -> float:
    ra, rb = naive_average_ranks(a), naive_average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den > 0 else math.nan


def naive_lds(scores, subsets, outputs, outputs_are="loss") -> list[float]:
    """Predictions as explicit sums over each subset's members, then naive Spearman per test point."""
    scores, outputs = scores.double(), outputs.double()
    sign = -1.0 if outputs_are == "loss" else 1.0
    out = []
    for i in range(scores.shape[0]):
        pred = [float(scores[i][subsets[k]].sum()) for k in range(subsets.shape[0])]
        out.append(naive_spearman(pred, [sign * float(v) for v in outputs[:, i]]))
    return out


def random_case(m, n_test, n_train, seed, ties: bool):
    g = torch.Generator().manual_seed(seed)
    if ties:
        # Small integers: many subsets get equal predicted sums and equal outputs.
        scores = torch.randint(-2, 3, (n_test, n_train), generator=g).double()
        outputs = torch.randint(0, 4, (m, n_test), generator=g).double()
    else:
        scores = torch.randn(n_test, n_train, generator=g, dtype=torch.float64)
        outputs = torch.randn(m, n_test, generator=g, dtype=torch.float64)
    subsets = torch.rand(m, n_train, generator=g) < 0.5
    return scores, subsets, outputs


# -- lds ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("m, n_test, n_train", [(2, 3, 5), (17, 6, 11), (40, 9, 23)])
@pytest.mark.parametrize("outputs_are", ["loss", "margin"])
def test_lds_matches_naive_reference(m, n_test, n_train, ties, outputs_are):
    scores, subsets, outputs = random_case(m, n_test, n_train, seed=m * 100 + n_train, ties=ties)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tie-heavy small cases may have constant columns
        got = lds(scores, subsets, outputs, outputs_are=outputs_are)
    expected = torch.tensor(naive_lds(scores, subsets, outputs, outputs_are), dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (n_test,)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    # Both sides work in float64 on the same half-integer ranks; they differ only in the
    # order of a few sums over at most 40 terms, a few ulp of 1.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13, equal_nan=True)


@pytest.mark.skipif(scipy_stats is None, reason="scipy not installed")
@pytest.mark.parametrize("ties", [False, True])
def test_lds_matches_scipy_spearmanr(ties):
    scores, subsets, outputs = random_case(60, 8, 31, seed=7, ties=ties)
    got = lds(scores, subsets, outputs, outputs_are="loss")
    pred = (subsets.double() @ scores.T).numpy()
    expected = [scipy_stats.spearmanr(pred[:, i], -outputs[:, i].numpy()).statistic for i in range(8)]
    # scipy ranks with its own average-rank code and float64 Pearson: agreement to rounding.
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_planted_linear_outputs_give_exactly_one():
    g = torch.Generator().manual_seed(3)
    # Integer scores make every predicted sum an exact float64 integer, so the planted
    # outputs below are exactly affine in it and their ranking is exactly the same.
    scores = torch.randint(-50, 51, (7, 30), generator=g).double()
    subsets = torch.rand(25, 30, generator=g) < 0.5
    pred = subsets.double() @ scores.T  # (25, 7)
    losses = 4.0 - 0.5 * pred  # more helpful points in the subset -> lower loss
    margins = 2.0 * pred + 1.0
    ones = torch.ones(7, dtype=torch.float64)
    assert torch.equal(lds(scores, subsets, losses, outputs_are="loss"), ones)
    assert torch.equal(lds(scores, subsets, margins, outputs_are="margin"), ones)
    # Scores with the opposite sign (Koh & Liang's I_up,loss) are exactly anti-correlated.
    assert torch.equal(lds(-scores, subsets, losses), -ones)
    # float32 scores holding the same integers give the same result (computed in float64).
    assert torch.equal(lds(scores.float(), subsets, losses.float()), ones)


def test_sign_convention_loss_versus_margin():
    scores, subsets, outputs = random_case(30, 5, 12, seed=11, ties=False)
    as_loss = lds(scores, subsets, outputs, outputs_are="loss")
    as_margin = lds(scores, subsets, outputs, outputs_are="margin")
    # Negating the outputs reverses each rank exactly (r -> m + 1 - r), so the two are exact negatives.
    assert torch.equal(as_loss, -as_margin)
    assert torch.equal(lds(scores, subsets, outputs), as_loss)  # "loss" is the default
    # A power-of-two scale of a row's scores is exact, so its ranking and LDS are unchanged.
    scale = torch.tensor([[4.0], [0.5], [1.0], [2.0**-10], [8.0]], dtype=torch.float64)
    assert torch.equal(lds(scores * scale, subsets, outputs), as_loss)
    # Training point 3 is helpful (positive score), point 7 harmful: subsets with 3 and
    # without 7 get lower losses. The predictions take only three values (-1, 0, 1), so even
    # a perfect ordering stays below 1 against continuous outputs (~0.9 here); the sign is the test.
    g = torch.Generator().manual_seed(5)
    subsets = torch.rand(50, 10, generator=g) < 0.5
    scores = torch.zeros(1, 10, dtype=torch.float64)
    scores[0, 3], scores[0, 7] = 1.0, -1.0
    member = subsets.double()
    loss = (1.0 - 0.3 * member[:, 3] + 0.3 * member[:, 7]).unsqueeze(1)
    loss += 0.01 * torch.rand(50, 1, generator=g, dtype=torch.float64)
    assert float(lds(scores, subsets, loss)[0]) > 0.8
    assert float(lds(scores, subsets, -loss, outputs_are="margin")[0]) > 0.8
    assert float(lds(-scores, subsets, loss)[0]) < -0.8  # Koh & Liang's sign: anti-correlated
    assert float(lds(scores, subsets, loss, outputs_are="margin")[0]) < -0.8  # losses passed as margins


def test_constant_outputs_or_predictions_give_nan_with_a_warning():
    scores, subsets, outputs = random_case(12, 4, 9, seed=2, ties=False)
    outputs[:, 1] = 0.7  # constant outputs for test point 1
    scores[2] = 0.0  # constant (zero) predictions for test point 2
    with pytest.warns(RuntimeWarning, match="2 of 4 test point"):
        got = lds(scores, subsets, outputs)
    assert torch.isnan(got[1]) and torch.isnan(got[2])
    assert torch.isfinite(got[[0, 3]]).all()
    expected = naive_lds(scores, subsets, outputs)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-13,
                               equal_nan=True)


def test_no_test_points_gives_an_empty_result():
    subsets = torch.ones(3, 4, dtype=torch.bool)
    got = lds(torch.zeros(0, 4), subsets, torch.zeros(3, 0))
    assert got.shape == (0,) and got.dtype == torch.float64


def test_exported_as_tfl_evaluation():
    assert tfl.evaluation.lds is lds and tfl.evaluation.retrain_subsets is retrain_subsets


def _good():
    scores, subsets, outputs = random_case(5, 3, 4, seed=0, ties=False)
    return {"scores": scores, "subsets": subsets, "outputs": outputs}


def _with(**changes):
    args = _good()
    args.update(changes)
    return args


def _nan_at(name, index):
    args = _good()
    t = args[name].clone()
    t[index] = math.nan if name == "scores" else math.inf
    args[name] = t
    return args


BAD_LDS = [
    (_with(scores=[[1.0]]), TypeError, r"scores must be a torch.Tensor \(n_test, n_train\), got list"),
    (_with(scores=torch.zeros(4)), ValueError, r"scores must be a 2-D tensor .*got shape \(4,\)"),
    (_with(scores=torch.zeros(3, 4, dtype=torch.int64)), TypeError,
     "scores must have a floating dtype, got torch.int64"),
    (_with(scores=torch.zeros(3, 0), subsets=torch.zeros(5, 0, dtype=torch.bool)), ValueError,
     r"scores must have at least one training column, got shape \(3, 0\)"),
    (_with(subsets=torch.zeros(5, 4)), TypeError, "subsets must be a bool mask .*got torch.float32"),
    (_with(subsets=torch.zeros(5, 4, 1, dtype=torch.bool)), ValueError, r"subsets must be a 2-D tensor"),
    (_with(subsets=torch.zeros(5, 6, dtype=torch.bool)), ValueError,
     r"subsets must have shape \(m, n_train=4\) .*got \(5, 6\)"),
    (_with(subsets=torch.zeros(1, 4, dtype=torch.bool), outputs=torch.zeros(1, 3)), ValueError,
     "subsets must hold at least 2 subsets .*got 1"),
    (_with(outputs=torch.zeros(5, 2)), ValueError,
     r"outputs must have shape \(m=5, n_test=3\) .*got \(5, 2\)"),
    (_with(outputs=torch.zeros(4, 3)), ValueError,
     r"outputs must have shape \(m=5, n_test=3\) .*got \(4, 3\)"),
    (_with(outputs=torch.zeros(5, 3, dtype=torch.int32)), TypeError,
     "outputs must have a floating dtype, got torch.int32"),
    (_with(outputs="losses"), TypeError, "outputs must be a torch.Tensor"),
    (_nan_at("scores", (1, 2)), ValueError,
     r"scores must be finite, got 1 NaN/inf value\(s\) \(first at \[1, 2\]\)"),
    (_nan_at("outputs", (4, 0)), ValueError,
     r"outputs must be finite, got 1 NaN/inf value\(s\) \(first at \[4, 0\]\)"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_LDS)
def test_lds_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        lds(**kwargs)


def test_lds_bad_outputs_are():
    with pytest.raises(ValueError, match=r"outputs_are must be one of \['loss', 'margin'\], got 'logit'"):
        lds(**_good(), outputs_are="logit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_lds_on_cuda_matches_cpu_and_checks_devices():
    args = _good()
    cpu = lds(**args)
    cuda = lds(**{k: v.cuda() for k, v in args.items()})
    assert cuda.is_cuda
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-13)  # same float64 math, other BLAS
    with pytest.raises(ValueError, match="outputs must be on the device of scores"):
        lds(args["scores"].cuda(), args["subsets"].cuda(), args["outputs"])


# -- retrain_subsets ----------------------------------------------------------------------------------

def fake_train(indices: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for training: (3,) outputs that depend on which indices were given."""
    i = indices.double()
    return torch.stack([i.sum(), (i * i).sum().sqrt(), torch.sin(i).sum()])


class Recorder:
    """fake_train that records the indices it gets, and stops with an exception at call number `fail_at`."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, indices):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("stopped")
        self.calls.append(indices.clone())
        return fake_train(indices)


def test_subsets_are_exact_size_sorted_and_reproducible():
    rec = Recorder()
    subsets, outputs = retrain_subsets(rec, 21, m=6, fraction=0.3, seed=4, progress=False)
    assert subsets.shape == (6, 21) and subsets.dtype == torch.bool
    assert outputs.shape == (6, 3) and outputs.dtype == torch.float64
    assert (subsets.sum(dim=1) == round(0.3 * 21)).all()
    for row, indices in enumerate(rec.calls):
        assert indices.dtype == torch.int64 and (indices[1:] > indices[:-1]).all()
        assert torch.equal(indices, subsets[row].nonzero().flatten())
        assert torch.equal(outputs[row], fake_train(indices))
    again = retrain_subsets(fake_train, 21, m=6, fraction=0.3, seed=4, progress=False)
    assert torch.equal(again[0], subsets) and torch.equal(again[1], outputs)
    other = retrain_subsets(fake_train, 21, m=6, fraction=0.3, seed=5, progress=False)
    assert not torch.equal(other[0], subsets)
    assert len({tuple(r.tolist()) for r in subsets}) == 6  # distinct draws, not one subset repeated


def test_subset_size_rounds_half_to_even():
    subsets, _ = retrain_subsets(fake_train, 5, m=3, fraction=0.5, progress=False)  # round(2.5) == 2
    assert (subsets.sum(dim=1) == 2).all()


def test_interrupted_run_resumes_without_repeating_finished_subsets(tmp_path):
    path = tmp_path / "retrain.safetensors"
    full_subsets, full_outputs = retrain_subsets(fake_train, 17, m=7, seed=1, progress=False)

    first = Recorder(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        retrain_subsets(first, 17, m=7, seed=1, progress=False, checkpoint=path)
    assert len(first.calls) == 3 and path.exists()
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind

    second = Recorder()
    subsets, outputs = retrain_subsets(second, 17, m=7, seed=1, progress=False, checkpoint=str(path))
    assert len(second.calls) == 4  # only rows 3..6
    for row, indices in zip(range(3, 7), second.calls):
        assert torch.equal(indices, full_subsets[row].nonzero().flatten())
    assert torch.equal(subsets, full_subsets) and torch.equal(outputs, full_outputs)

    third = Recorder()  # a finished checkpoint: nothing is retrained
    subsets, outputs = retrain_subsets(third, 17, m=7, seed=1, progress=False, checkpoint=path)
    assert third.calls == [] and torch.equal(outputs, full_outputs)


def test_bad_train_fn_output_keeps_finished_rows(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    calls = []

    def flaky(indices):
        calls.append(1)
        out = fake_train(indices)
        if len(calls) == 3:
            out[1] = math.nan
        return out

    message = r"train_fn returned 1 NaN/inf value\(s\) for subset 2 \(first at test point 1\)"
    with pytest.raises(ValueError, match=message):
        retrain_subsets(flaky, 10, m=4, progress=False, checkpoint=path)
    rec = Recorder()
    _, outputs = retrain_subsets(rec, 10, m=4, progress=False, checkpoint=path)
    assert len(rec.calls) == 2  # rows 2 and 3; rows 0 and 1 came from the checkpoint
    assert torch.equal(outputs, retrain_subsets(fake_train, 10, m=4, progress=False)[1])


@pytest.mark.parametrize("change, message", [
    ({"n_train": 18}, "made with n_train=17, but this call has n_train=18"),
    ({"m": 8}, "made with m=7, but this call has m=8"),
    ({"fraction": 0.4}, "made with fraction=0.5, but this call has fraction=0.4"),
    ({"seed": 2}, "made with seed=1, but this call has seed=2"),
])
def test_checkpoint_from_other_settings_is_refused(tmp_path, change, message):
    path = tmp_path / "c.safetensors"
    retrain_subsets(fake_train, 17, m=7, seed=1, progress=False, checkpoint=path)
    args = {"n_train": 17, "m": 7, "fraction": 0.5, "seed": 1, **change}
    rec = Recorder()
    with pytest.raises(ValueError, match=message):
        retrain_subsets(rec, args.pop("n_train"), **args, progress=False, checkpoint=path)
    assert rec.calls == []


def test_foreign_checkpoint_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        retrain_subsets(fake_train, 10, m=3, progress=False, checkpoint=junk)
    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match=r"was not written by retrain_subsets .*tensors \['weights'\]"):
        retrain_subsets(fake_train, 10, m=3, progress=False, checkpoint=other)
    with pytest.raises(ValueError, match="checkpoint must be a file path, got .* which is a directory"):
        retrain_subsets(fake_train, 10, m=3, progress=False, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="checkpoint's folder must exist"):
        retrain_subsets(fake_train, 10, m=3, progress=False, checkpoint=tmp_path / "no" / "c.safetensors")


def _rewrite(path, change):
    """Rewrites a checkpoint with `change(tensors, metadata)` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_checkpoint_of_other_subsets_or_shapes_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    retrain_subsets(fake_train, 12, m=4, progress=False, checkpoint=path)
    _rewrite(path, lambda t, meta: meta.update(subsets_sha256="0" * 64))  # as if drawn by another torch
    with pytest.raises(ValueError, match="was made from other subsets than this torch version draws"):
        retrain_subsets(fake_train, 12, m=4, progress=False, checkpoint=path)

    retrain_subsets(fake_train, 12, m=4, progress=False, checkpoint=tmp_path / "d.safetensors")
    _rewrite(tmp_path / "d.safetensors", lambda t, meta: t.update(outputs=t["outputs"][:3]))
    with pytest.raises(ValueError, match=r"holds outputs \(3, 3\) torch.float64 .*expected \(4, n_test\)"):
        retrain_subsets(fake_train, 12, m=4, progress=False, checkpoint=tmp_path / "d.safetensors")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"train_fn": 3}, TypeError, "train_fn must be callable, got int"),
    ({"n_train": 1}, ValueError, "n_train must be >= 2, got 1"),
    ({"n_train": 10.0}, TypeError, "n_train must be an int, got float"),
    ({"m": 0}, ValueError, "m must be >= 1, got 0"),
    ({"m": True}, TypeError, "m must be an int, got bool"),
    ({"seed": "0"}, TypeError, "seed must be an int, got str"),
    ({"fraction": 0.0}, ValueError, r"fraction must be a number in \(0, 1\), got 0.0"),
    ({"fraction": 1}, ValueError, r"fraction must be a number in \(0, 1\), got 1"),
    ({"fraction": 0.01}, ValueError,
     r"must round to a subset size in \[1, n_train - 1\] = \[1, 9\], got round"),
    ({"fraction": 0.97}, ValueError, r"= \[1, 9\], got round\(0.97 \* 10\) = 10"),
    ({"progress": 1}, TypeError, "progress must be a bool, got int"),
    ({"checkpoint": 5}, TypeError, "checkpoint must be a path"),
])
def test_retrain_subsets_bad_arguments(kwargs, error, message):
    args = {"train_fn": fake_train, "n_train": 10, "m": 3, "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        retrain_subsets(args.pop("train_fn"), args.pop("n_train"), **args)


@pytest.mark.parametrize("result, error, message", [
    (lambda i: [1.0, 2.0], TypeError, "train_fn must return a torch.Tensor .*got list for subset 0"),
    (lambda i: torch.zeros(2, 3), ValueError, r"1-D tensor \(n_test,\), got shape \(2, 3\) for subset 0"),
    (lambda i: torch.zeros(3, dtype=torch.int64), TypeError, "floating tensor, got torch.int64 for subset 0"),
    (lambda i: torch.zeros(int(i[0]) + 2), ValueError, "same n_test=.* for every subset, got"),
])
def test_retrain_subsets_bad_train_fn_results(result, error, message):
    with pytest.raises(error, match=message):
        # seed 0's first two subsets of range(10) start at different indices, so the
        # changing-length case really changes length at subset 1
        retrain_subsets(result, 10, m=3, progress=False)
