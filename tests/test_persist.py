"""Saved solvers: fit, save, load on a copy of the model: the same influences; bad loads are refused.

The oracle of a round trip is the solver that was saved: a load restores the
same float64 tensors with the same memory layout, so every solve after a load
runs the same arithmetic as before the save and the influences must be equal
bit for bit (where a load recomputes something, the test says why and what
tolerance it takes).
"""

import copy
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchfluence import persist
from torchfluence.influence import InfluenceFunctionModel

LOSS = F.cross_entropy

# (id, class, constructor arguments): every solver, with the preconditioners of CG that have fitted state.
SOLVERS = [
    ("direct", tfl.DirectInfluence, dict(regularization=1.0)),
    ("cg", tfl.CgInfluence, dict(regularization=1.0, rtol=1e-4)),
    ("cg-jacobi", tfl.CgInfluence, dict(regularization=1.0, rtol=1e-4, preconditioner="jacobi")),
    ("cg-ekfac", tfl.CgInfluence, dict(regularization=1.0, rtol=1e-4, preconditioner="ekfac")),
    ("cg-nystroem", tfl.CgInfluence, dict(regularization=1.0, rtol=1e-4, preconditioner="nystroem",
                                          preconditioner_rank=5, second_order="gauss_newton")),
    ("lissa", tfl.LissaInfluence, dict(regularization=1.0, maxiter=10, scale=50.0, seed=3)),
    ("arnoldi", tfl.ArnoldiInfluence, dict(regularization=1.0, rank=8, krylov_dimension=57)),
    ("nystroem", tfl.NystroemSketchInfluence, dict(regularization=1.0, rank=8, second_order="gauss_newton")),
    ("kfac", tfl.KfacInfluence, dict(regularization=1.0)),
    ("ekfac", tfl.EkfacInfluence, dict(regularization=1.0, fisher="exact")),
    ("datainf", tfl.InverseHarmonicMeanInfluence, dict(regularization=1.0)),
]
IDS = [case[0] for case in SOLVERS]
NEEDS_DATA = {tfl.CgInfluence, tfl.LissaInfluence, tfl.InverseHarmonicMeanInfluence}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    xt = torch.randn(4, 5, dtype=torch.float64, generator=g)
    yt = torch.randint(0, 3, (4,), generator=g)
    return x, y, xt, yt


@pytest.fixture(scope="module")
def fitted(data):
    """Every solver fitted once on the MLP, with its influences before any save."""
    x, y, xt, yt = data
    out = {}
    for name, cls, kwargs in SOLVERS:
        model = mlp()
        im = cls(model, LOSS, **kwargs).fit((x, y))
        out[name] = (model, im, im.influences(xt, yt, x, y))
    return out


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@pytest.mark.parametrize("name", IDS)
def test_round_trip_gives_the_same_influences_bitwise(fitted, data, tmp_path, name):
    x, y, xt, yt = data
    model, im, expected = fitted[name]
    path = im.save(tmp_path / f"{name}.safetensors")
    cls = type(im)
    train = (x, y) if cls in NEEDS_DATA else None
    loaded = cls.load(path, fresh_copy(model), LOSS, train_data=train)
    assert type(loaded) is cls and loaded.is_fitted and loaded.n_train == 24
    # The same saved tensors, the same layouts, the same solve: equal bits.
    assert torch.equal(loaded.influences(xt, yt, x, y), expected)
    # The base class takes whichever solver class the file holds.
    again = InfluenceFunctionModel.load(path, fresh_copy(model), LOSS, train_data=train)
    assert type(again) is cls
    saved, restored = im.fitted_state()[0], again.fitted_state()[0]
    assert saved.keys() == restored.keys()
    for key, value in saved.items():
        assert torch.equal(restored[key], value) and restored[key].stride() == value.stride(), key


@pytest.mark.parametrize("name", ["direct", "arnoldi", "nystroem", "kfac", "ekfac"])
def test_closed_form_solvers_score_without_the_training_data(fitted, data, tmp_path, name):
    x, y, xt, yt = data
    model, im, expected = fitted[name]
    path = im.save(tmp_path / "s.safetensors")
    loaded = type(im).load(path, fresh_copy(model), LOSS)
    assert torch.equal(loaded.influences(xt, yt, x, y), expected)
    assert torch.equal(loaded.self_influences(x, y), im.self_influences(x, y))
    # A loaded solver saves again to the same bytes (no time stamps, same tensors and layouts).
    assert loaded.save(tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    top = loaded.top_k(xt, yt, (x, y), k=3)  # explicit data: fine
    assert torch.equal(top.helpful_indices, im.top_k(xt, yt, (x, y), k=3).helpful_indices)
    with pytest.raises(RuntimeError, match="without train_data.*pass train_data="):
        loaded.train_influences(xt, yt)
    with pytest.raises(RuntimeError, match="without train_data"):
        loaded.top_k(xt, yt, k=3)
    # With the training data at load, the fitted-data methods work as before the save.
    with_data = type(im).load(path, fresh_copy(model), LOSS, train_data=(x, y))
    assert torch.equal(with_data.train_influences(xt, yt), im.train_influences(xt, yt))
    assert torch.equal(with_data.top_k(xt, yt, k=3).harmful_values, im.top_k(xt, yt, k=3).harmful_values)


@pytest.mark.parametrize("name", ["cg", "lissa", "datainf"])
def test_solvers_that_read_the_training_data_need_it_at_load(fitted, data, tmp_path, name):
    x, y, _, _ = data
    model, im, _ = fitted[name]
    path = im.save(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="train_data.*24 samples"):
        type(im).load(path, fresh_copy(model), LOSS)
    with pytest.raises(ValueError, match="24 training samples.*got 23"):
        type(im).load(path, fresh_copy(model), LOSS, train_data=(x[:23], y[:23]))


def test_a_different_model_is_refused(fitted, tmp_path):
    model, im, _ = fitted["direct"]
    path = im.save(tmp_path / "s.safetensors")
    other = fresh_copy(model)
    with torch.no_grad():
        other[2].weight[1, 2] += 1e-12  # one weight, one rounding step: still another model
    with pytest.raises(ValueError, match="different model.*fingerprint"):
        tfl.DirectInfluence.load(path, other, LOSS)
    buffers = fresh_copy(model)
    buffers.register_buffer("scale", torch.ones(1))  # a buffer counts too
    with pytest.raises(ValueError, match="different model"):
        tfl.DirectInfluence.load(path, buffers, LOSS)


def test_another_solver_class_is_refused_naming_both(fitted, tmp_path):
    model, im, _ = fitted["kfac"]
    path = im.save(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match=r"holds a saved torchfluence\.solvers\.kfac\.KfacInfluence, not a "
                                         r"torchfluence\.solvers\.kfac\.EkfacInfluence"):
        tfl.EkfacInfluence.load(path, fresh_copy(model), LOSS)
    with pytest.raises(ValueError, match="KfacInfluence.*DirectInfluence"):
        tfl.DirectInfluence.load(path, fresh_copy(model), LOSS)


def test_missing_truncated_corrupt_and_foreign_files_are_refused(fitted, tmp_path):
    model, im, _ = fitted["arnoldi"]
    path = im.save(tmp_path / "s.safetensors")
    raw = path.read_bytes()
    with pytest.raises(FileNotFoundError, match="no saved solver"):
        tfl.ArnoldiInfluence.load(tmp_path / "absent.safetensors", model, LOSS)
    for cut in (len(raw) - 8, len(raw) // 2, 40, 3, 0):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            tfl.ArnoldiInfluence.load(truncated, model, LOSS)
    flipped = bytearray(raw)
    flipped[-5] ^= 0x01  # one bit of the last tensor's data: the header still parses
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt: its tensors do not match the digest"):
        tfl.ArnoldiInfluence.load(tmp_path / "flip.safetensors", model, LOSS)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a saved torchfluence solver"):
        tfl.ArnoldiInfluence.load(tmp_path / "plain.safetensors", model, LOSS)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        tfl.ArnoldiInfluence.load(3, model, LOSS)


def rewrite_header(path, out, change):
    """Copies a saved solver with its JSON header changed by `change(header)`."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[persist.METADATA_KEY])
    change(header)
    save_file(load_file(str(path)), str(out), metadata={persist.METADATA_KEY: json.dumps(header)})
    return out


def test_an_unknown_format_version_is_refused(fitted, tmp_path):
    model, im, _ = fitted["nystroem"]
    path = im.save(tmp_path / "s.safetensors")
    newer = rewrite_header(path, tmp_path / "v2.safetensors", lambda h: h.update(format_version=2))
    with pytest.raises(ValueError, match="format version 2.*reads version 1"):
        tfl.NystroemSketchInfluence.load(newer, fresh_copy(model), LOSS)


def test_the_file_is_safetensors_and_loading_unpickles_nothing(fitted, data, tmp_path, monkeypatch):
    x, y, xt, yt = data
    model, im, expected = fitted["ekfac"]
    path = im.save(tmp_path / "s.safetensors")
    raw = path.read_bytes()
    # safetensors layout: an 8-byte little-endian header length, then a JSON header.
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"][persist.METADATA_KEY]
    meta = json.loads(header["__metadata__"][persist.METADATA_KEY])
    assert meta["solver"] == "torchfluence.solvers.kfac.EkfacInfluence" and meta["n_train"] == 24
    assert meta["options"]["regularization"] == 1.0 and meta["options"]["dtype"] == "float64"
    assert meta["model_fingerprint"] == im.model_fingerprint()
    assert {"torch_version", "torchfluence_version", "format_version"} <= set(meta)

    def refuse(*args, **kwargs):
        raise AssertionError("a load must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = tfl.EkfacInfluence.load(path, fresh_copy(model), LOSS)
    assert torch.equal(loaded.influences(xt, yt, x, y), expected)


def test_saving_an_unfitted_or_changed_solver_is_refused(data, tmp_path):
    x, y, _, _ = data
    model = mlp()
    im = tfl.DirectInfluence(model, LOSS, 1.0)
    with pytest.raises(RuntimeError, match="not fitted: call .fit"):
        im.save(tmp_path / "s.safetensors")
    im.fit((x, y))
    with torch.no_grad():
        model[0].bias += 1.0  # trained further after the fit
    with pytest.raises(RuntimeError, match="changed after the solver was built"):
        im.save(tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


def test_writes_are_atomic_and_leave_no_temporary_files(fitted, tmp_path):
    model, im, _ = fitted["kfac"]
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"old contents")
    im.save(path)  # replaces the old file in one rename
    assert os.listdir(tmp_path) == ["s.safetensors"]
    assert tfl.KfacInfluence.load(path, fresh_copy(model), LOSS).is_fitted
    with pytest.raises(FileNotFoundError, match="directory .* does not exist"):
        im.save(tmp_path / "missing" / "s.safetensors")
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_overrides_runtime_ones_apply_fit_ones_are_refused(fitted, data, tmp_path):
    x, y, xt, yt = data
    model, im, expected = fitted["direct"]
    path = im.save(tmp_path / "s.safetensors")
    loaded = tfl.DirectInfluence.load(path, fresh_copy(model), LOSS, block_size=7, progress=False)
    assert loaded.block_size == 7
    # Blocks of 7 samples change only how the scoring GEMMs are cut: the same sums to float64 rounding.
    torch.testing.assert_close(loaded.influences(xt, yt, x, y), expected, rtol=1e-12, atol=1e-14)
    # A new lambda refactors the saved H: the same bits as with_regularization on the fitted solver.
    relaxed = tfl.DirectInfluence.load(path, fresh_copy(model), LOSS, regularization=2.0)
    reference = copy.copy(im).with_regularization(2.0)
    assert torch.equal(relaxed.influences(xt, yt, x, y), reference.influences(xt, yt, x, y))
    with pytest.raises(ValueError, match="dtype.*fitted with dtype='float64'.*float32"):
        tfl.DirectInfluence.load(path, fresh_copy(model), LOSS, dtype=torch.float32)
    with pytest.raises(ValueError, match="second_order.*fitted with"):
        tfl.DirectInfluence.load(path, fresh_copy(model), LOSS, second_order="gauss_newton")
    same = tfl.DirectInfluence.load(path, fresh_copy(model), LOSS, second_order="hessian")  # equal: accepted
    assert torch.equal(same.influences(xt, yt, x, y), expected)
    with pytest.raises(TypeError, match="unknown option.*'rank'"):
        tfl.DirectInfluence.load(path, fresh_copy(model), LOSS, rank=3)
    model_a, arnoldi, _ = fitted["arnoldi"]
    path_a = arnoldi.save(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="rank.*fitted with rank=8.*rank=4"):
        tfl.ArnoldiInfluence.load(path_a, fresh_copy(model_a), LOSS, rank=4)
    with pytest.raises(ValueError, match="cross_entropy loss, got a mse loss"):
        tfl.ArnoldiInfluence.load(path_a, fresh_copy(model_a), F.mse_loss)


def test_cg_solve_options_may_change_at_load(fitted, data, tmp_path):
    x, y, xt, yt = data
    model, im, expected = fitted["cg-jacobi"]
    path = im.save(tmp_path / "s.safetensors")
    tight = tfl.CgInfluence.load(path, fresh_copy(model), LOSS, train_data=(x, y), rtol=1e-10)
    assert tight.rtol == 1e-10 and torch.equal(tight.diagonal, im.diagonal)
    exact = tfl.DirectInfluence(model, LOSS, 1.0).fit((x, y)).influences(xt, yt, x, y)

    def error(scores):
        return float((scores - exact).norm() / exact.norm())

    # H + I has condition number about 4 here, so a relative residual r bounds the relative
    # error of each solve, and of the scores, by about 4 r: 4e-10 after the load, 4e-4 before.
    assert error(tight.influences(xt, yt, x, y)) < 1e-8
    assert 1e-8 < error(expected) < 1e-3  # the saved rtol was looser: the new one took effect
    with pytest.raises(ValueError, match="preconditioner.*fitted with preconditioner='jacobi'"):
        tfl.CgInfluence.load(path, fresh_copy(model), LOSS, train_data=(x, y), preconditioner="nystroem")


def test_datainf_with_blocks_and_per_block_regularization(data, tmp_path):
    x, y, xt, yt = data
    model = mlp()
    structure = {"first": ["0.weight", "0.bias"], "last": ["2.weight", "2.bias"]}
    im = tfl.InverseHarmonicMeanInfluence(model, LOSS, {"first": 0.3, "last": 0.7}, block_structure=structure)
    expected = im.fit((x, y)).influences(xt, yt, x, y)
    path = im.save(tmp_path / "s.safetensors")
    loaded = tfl.InverseHarmonicMeanInfluence.load(path, fresh_copy(model), LOSS, train_data=(x, y))
    assert loaded.block_regularization == {"first": 0.3, "last": 0.7}
    assert torch.equal(loaded.influences(xt, yt, x, y), expected)


# -- head mode ----------------------------------------------------------------------------------------
def frozen_backbone(tail: bool = False) -> nn.Module:
    """A frozen Linear + Tanh backbone and a trainable head: a Linear, or (tail) Linear, Tanh, Linear."""
    torch.manual_seed(2)
    head = [nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)] if tail else [nn.Linear(6, 3)]
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), *head).double().eval()
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("cls, kwargs, head", [
    (tfl.DirectInfluence, dict(regularization=0.1), None),  # found automatically
    (tfl.EkfacInfluence, dict(regularization=0.1), "2"),  # given by name
    (tfl.KfacInfluence, dict(regularization=0.1), True),  # "auto"
], ids=["direct-auto", "ekfac-named", "kfac-true"])
def test_head_mode_round_trip(data, tmp_path, cls, kwargs, head):
    x, y, xt, yt = data
    model = frozen_backbone()
    im = cls(model, LOSS, head=head, **kwargs).fit((x, y))
    assert im.features is not None and im.num_params == 21
    expected, train_scores = im.influences(xt, yt, x, y), im.train_influences(xt, yt)
    path = im.save(tmp_path / "s.safetensors")
    loaded = cls.load(path, fresh_copy(model), LOSS, train_data=(x, y))
    assert loaded.features is not None and loaded.features.head_name == "2"
    assert loaded.functions.names == im.functions.names
    assert (loaded._full_model is None) == (im._full_model is None)  # perturbation mode kept where it was
    assert torch.equal(loaded.influences(xt, yt, x, y), expected)
    assert torch.equal(loaded.train_influences(xt, yt), train_scores)  # from features cached at load


def test_head_mode_trainable_tail_with_cg(data, tmp_path):
    x, y, xt, yt = data
    model = frozen_backbone(tail=True)
    im = tfl.CgInfluence(model, LOSS, 0.1, second_order="gauss_newton").fit((x, y))
    assert im.features is not None and im.features.backbone is not None  # a traced tail
    expected = im.influences(xt, yt, x, y)
    path = im.save(tmp_path / "s.safetensors")
    loaded = tfl.CgInfluence.load(path, fresh_copy(model), LOSS, train_data=(x, y),
                                  cache_dir=tmp_path / "cache")
    assert loaded.features.backbone is not None and loaded._full_model is not None
    assert loaded.features.cache_path.parent == tmp_path / "cache" and loaded.features.cache_path.exists()
    # The cached features are the same numbers, now memory-mapped: CG runs the same products.
    assert torch.equal(loaded.influences(xt, yt, x, y), expected)


def test_head_mode_needs_the_same_trainable_parameters(data, tmp_path):
    x, y, _, _ = data
    model = frozen_backbone()
    path = tfl.DirectInfluence(model, LOSS, 0.1).fit((x, y)).save(tmp_path / "s.safetensors")
    thawed = fresh_copy(model)
    for p in thawed.parameters():
        p.requires_grad_(True)  # same weights, so the same fingerprint, but no frozen backbone
    with pytest.raises(ValueError, match="differs from the saved one in head.*requires_grad"):
        tfl.DirectInfluence.load(path, thawed, LOSS)


# -- convolutions -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [tfl.KfacInfluence, tfl.EkfacInfluence], ids=["kfac", "ekfac"])
def test_conv_net_round_trip(tmp_path, cls):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    model = model.double().eval()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    im = cls(model, LOSS, 0.05).fit((x, y))
    expected = im.influences(x[:3], y[:3], x, y)
    path = im.save(tmp_path / "s.safetensors")
    loaded = cls.load(path, fresh_copy(model), LOSS)
    assert list(loaded.factors) == ["0", "3"]
    for name, f in im.factors.items():
        assert torch.equal(loaded.factors[name].eigenvalues, f.eigenvalues)
    assert torch.equal(loaded.influences(x[:3], y[:3], x, y), expected)
    by_layer = loaded.influences_by_layer(x[:3], y[:3], x, y)
    assert all(torch.equal(by_layer[k], v) for k, v in im.influences_by_layer(x[:3], y[:3], x, y).items())


def test_a_float32_model_round_trip(tmp_path):
    """Solves in float32 read float32 copies of the float64 factors, made again at load the same way."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    im = tfl.EkfacInfluence(model, LOSS, 0.1).fit((x, y))
    path = im.save(tmp_path / "s.safetensors")
    loaded = tfl.EkfacInfluence.load(path, fresh_copy(model), LOSS)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.influences(x[:3], y[:3], x, y), im.influences(x[:3], y[:3], x, y))


def test_embedding_layers_round_trip(tmp_path):
    """An embedding's input-side eigenbasis is the token basis: nothing saved for it, None again at load."""
    torch.manual_seed(6)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(11, 4), nn.Linear(4, 3)

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)).mean(1))

    model = Bag().double().eval()
    x, y = torch.randint(0, 11, (30, 5)), torch.randint(0, 3, (30,))
    im = tfl.EkfacInfluence(model, LOSS, 0.1).fit((x, y))
    path = im.save(tmp_path / "s.safetensors")
    loaded = tfl.EkfacInfluence.load(path, fresh_copy(model), LOSS)
    assert loaded.factors["emb"].activation_eigenvectors is None
    assert torch.equal(loaded.influences(x[:3], y[:3], x, y), im.influences(x[:3], y[:3], x, y))


# -- the pyDVL-compatible classes ---------------------------------------------------------------------
def pydvl_cases():
    from torchfluence import pydvl as P

    gn = P.SecondOrderMode.GAUSS_NEWTON
    layers = P.BlockMode.LAYER_WISE
    return [
        ("direct-layers", lambda m: P.DirectInfluence(m, LOSS, {"0": 1.0, "2": 1.2}, block_structure=layers)),
        ("cg-jacobi", lambda m: P.CgInfluence(m, LOSS, 1.0, rtol=1e-3,
                                              preconditioner=P.JacobiPreconditioner(3))),
        ("cg-layers-nystroem", lambda m: P.CgInfluence(m, LOSS, 1.0, block_structure=layers,
                                                        second_order_mode=gn,
                                                        preconditioner=P.NystroemPreconditioner(3))),
        ("lissa-params", lambda m: P.LissaInfluence(m, LOSS, 1.0, maxiter=10, scale=50.0,
                                                    warn_on_max_iteration=False,
                                                    block_structure=P.BlockMode.PARAMETER_WISE)),
        ("arnoldi-layers", lambda m: P.ArnoldiInfluence(m, LOSS, 1.0, rank=5, block_structure=layers)),
        ("nystroem", lambda m: P.NystroemSketchInfluence(m, LOSS, 1.0, rank=5, second_order_mode=gn)),
        ("ekfac", lambda m: P.EkfacInfluence(m, update_diagonal=True, hessian_regularization=0.1)),
        ("datainf-layers", lambda m: P.InverseHarmonicMeanInfluence(m, LOSS, {"0": 1.0, "2": 0.3},
                                                                    block_structure=layers)),
    ]


@pytest.mark.parametrize("index", range(8), ids=[case[0] for case in pydvl_cases()])
def test_pydvl_classes_round_trip(data, tmp_path, index):
    from torch.utils.data import DataLoader, TensorDataset

    x, y, xt, yt = data
    _, make = pydvl_cases()[index]
    model = mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    im = make(model).fit(loader)
    expected = im.influences(xt, yt, x, y)
    path = im.save(tmp_path / "s.safetensors")
    cls = type(im)
    train = loader if cls.traits.solve_reads_train_data else None
    loaded = cls.load(path, fresh_copy(model), LOSS, train_data=train)
    assert type(loaded) is cls
    assert getattr(loaded, "block_names", None) == getattr(im, "block_names", None)
    # Each block's state is restored into that block's solver: the same solves, the same bits.
    assert torch.equal(loaded.influences(xt, yt, x, y), expected)
    native = next(c for c in cls.__mro__[1:] if c.__module__.startswith("torchfluence.solvers"))
    with pytest.raises(ValueError, match=r"torchfluence\.pydvl\..*not a torchfluence\.solvers"):
        native.load(path, fresh_copy(model), LOSS, train_data=train)


def test_pydvl_block_regularization_set_after_fit_is_saved(data, tmp_path):
    from torchfluence import pydvl as P

    x, y, xt, yt = data
    model = mlp()
    im = P.DirectInfluence(model, LOSS, 1.0, block_structure=P.BlockMode.LAYER_WISE).fit((x, y))
    im.with_regularization({"0": 1.5, "2": 1.25})
    path = im.save(tmp_path / "s.safetensors")
    loaded = P.DirectInfluence.load(path, fresh_copy(model), LOSS)
    assert loaded.block_regularization == {"0": 1.5, "2": 1.25}
    assert torch.equal(loaded.influences(xt, yt, x, y), im.influences(xt, yt, x, y))
    with pytest.raises(ValueError, match="block_structure.*fitted with"):
        P.DirectInfluence.load(path, fresh_copy(model), LOSS, block_structure=P.BlockMode.FULL)
    # The same value as saved, spelled as pyDVL's enum: accepted.
    again = P.DirectInfluence.load(path, fresh_copy(model), LOSS, second_order_mode=P.SecondOrderMode.HESSIAN)
    assert torch.equal(again.influences(xt, yt, x, y), im.influences(xt, yt, x, y))
