"""Every bad input gets a clear error naming the argument, or works correctly; none is silently wrong."""

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .digits import digits, loader, mlp

X, Y, XT, YT = digits(n_train=40, n_test=5)


class DictLoader:
    def __iter__(self):
        yield {"x": X[:8], "y": Y[:8]}


class TripleLoader:
    def __iter__(self):
        yield X[:8], Y[:8], torch.arange(8)


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return None, self.net(x)  # the default output transform takes element 0


class DictModel(TupleModel):
    def forward(self, x):
        return {"scores": self.net(x)}  # the default output transform takes "logits"


def _cg(model=None, loss=F.cross_entropy, reg=0.1, **kwargs):
    # The untrained MLP's Hessian is indefinite: the Gauss-Newton matrix keeps CG well posed.
    return tfl.CgInfluence(mlp() if model is None else model, loss, reg, second_order="gauss_newton", **kwargs)


def _fitted():
    return _cg().fit(loader(X, Y, 16))


def _with_nan_weight():
    model = mlp()
    with torch.no_grad():
        model[0].weight[2, 3] = float("nan")
    return _cg(model)


def _with_bad(tensor, index, value):
    bad = tensor.clone()
    bad[index] = value
    return bad


def _generator():
    return ((X[i:i + 8], Y[i:i + 8]) for i in range(0, 40, 8))


# (name, call, expected exception, regex the message must match)
CASES = [
    ("mismatched lengths", lambda: _fitted().influences(XT, YT[:4]), ValueError,
     r"inputs and targets must have the same number of samples, got 5 and 4"),
    ("float labels for cross-entropy", lambda: _cg().fit((X, Y.double())), TypeError,
     r"targets for cross_entropy must be class indices of dtype torch.long \(int64\), got torch.float64"),
    ("int32 labels for cross-entropy", lambda: _cg().fit((X, Y.int())), TypeError,
     r"torch.long \(int64\), got torch.int32"),
    ("labels out of range", lambda: _cg().fit((X, _with_bad(Y, 7, 12))), ValueError,
     r"targets must be class indices in \[0, 10\) for the model's 10 outputs, got 12 at sample 7"),
    ("negative label in a test point", lambda: _fitted().influences(XT, _with_bad(YT, 3, -1)), ValueError,
     r"class indices in \[0, 10\).* got -1 at sample 3"),
    ("empty data", lambda: _cg().fit(loader(X[:0], Y[:0])), ValueError, r"train_data is empty"),
    ("empty pair", lambda: _cg().fit((X[:0], Y[:0])), ValueError, r"train_data is empty"),
    # Dicts and longer tuples are batches (model inputs plus targets): these do not fit the model.
    ("loader yielding dicts", lambda: _cg().fit(DictLoader()), TypeError,
     r"the model was called with a dict batch's entries \['x', 'y'\] as keyword arguments .*unexpected keyword"),
    ("loader yielding 3-tuples", lambda: _cg().fit(TripleLoader()), TypeError,
     r"called with a tuple batch's first 2 elements as positional arguments \(its last held back"),
    ("one-shot generator to fit", lambda: _cg().fit(_generator()), TypeError,
     r"train_data is a one-shot iterator \(generator\), but CgInfluence.fit reads the data several times"),
    ("a bare tensor as data", lambda: _cg().fit(X), TypeError,
     r"train_data must be a DataLoader, an \(x, y\) pair of tensors.* got a tensor of shape \(40, 64\)"),
    ("reduction='none'", lambda: _cg(loss=nn.CrossEntropyLoss(reduction="none")).fit((X, Y)), ValueError,
     r"loss must return a scalar \(the mean over the batch\), got shape \(1,\)"),
    ("reduction='sum'", lambda: _cg(loss=nn.CrossEntropyLoss(reduction="sum")).fit((X, Y)), ValueError,
     r"loss must return the mean over the batch \(reduction='mean'\): two copies of one sample give"),
    ("NaN input", lambda: _cg().fit((_with_bad(X, (5, 2), float("nan")), Y)), ValueError,
     r"train_data inputs: 1 value\(s\) are NaN or inf \(first at sample 5\)"),
    ("inf test input", lambda: _fitted().influences(_with_bad(XT, (4, 0), float("inf")), YT), ValueError,
     r"inputs: 1 value\(s\) are NaN or inf \(first at sample 4\)"),
    ("NaN weight", _with_nan_weight, ValueError, r"model parameters: 1 value\(s\) are NaN or inf"),
    ("NaN regression target", lambda: tfl.CgInfluence(nn.Linear(64, 2).double(), F.mse_loss, 0.1).fit(
        (X, _with_bad(torch.zeros(40, 2, dtype=torch.float64), (9, 1), float("nan")))), ValueError,
     r"train_data targets: 1 value\(s\) are NaN or inf \(first at sample 9\)"),
    ("k > n_train", lambda: _fitted().top_k(XT, YT, k=41), ValueError,
     r"k must be at most the number of training samples \(40\), got 41"),
    ("k = 0", lambda: _fitted().top_k(XT, YT, k=0), ValueError, r"k must be a positive int, got 0"),
    ("rank > p", lambda: tfl.ArnoldiInfluence(mlp(), F.cross_entropy, 0.1, rank=10_000), ValueError,
     r"rank must be at most the number of parameters \(910\), got 10000"),
    ("negative regularization", lambda: _cg(reg=-0.5), ValueError,
     r"regularization must be a finite number >= 0, got -0.5"),
    ("NaN regularization", lambda: _cg(reg=float("nan")), ValueError,
     r"regularization must be a finite number >= 0, got nan"),
    ("half-precision model", lambda: _cg(mlp(dtype=torch.float16)), ValueError,
     r"dtype: the model's parameters are \['torch.float16'\].* pass dtype=torch.float32"),
    ("bfloat16 dtype requested", lambda: _cg(dtype=torch.bfloat16), ValueError,
     r"dtype must be torch.float32, torch.float64 or None \(the model's\), got torch.bfloat16"),
    ("parameters on two devices", lambda: _cg(_split_devices()), ValueError,
     r"model: the selected parameters must be on one device, got \['cpu', 'meta'\]"),
    ("model returning a tuple", lambda: _cg(TupleModel()).fit((X, Y)), TypeError,
     r"element 0 of the tuple is a NoneType, not a Tensor; pass output_transform="),
    ("model returning a dict", lambda: _cg(DictModel()).fit((X, Y)), TypeError,
     r"dict with keys \['scores'\] and no 'logits'; pass output_transform="),
    ("block_size 0", lambda: _cg(block_size=0), ValueError, r"block_size must be a positive int, got 0"),
    ("factors of the wrong width", lambda: _fitted().influences_from_factors(torch.zeros(2, 3), X, Y), ValueError,
     r"factors must have shape \(n_test, 910\), got \(2, 3\)"),
    ("mode 'down'", lambda: _fitted().influences(XT, YT, mode="down"), ValueError,
     r"mode must be one of \['up', 'perturbation'\], got 'down'"),
]


def _split_devices():
    model = mlp()
    model[2].to("meta")
    return model


@pytest.mark.parametrize("name,call,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_float64_model_is_computed_in_float64():
    im = _cg(rtol=1e-12).fit((X, Y))
    assert im.dtype == torch.float64 and im.influence_factors(XT, YT).dtype == torch.float64
    assert _cg(mlp(dtype=torch.float32)).dtype == torch.float32


def test_half_precision_model_works_with_an_explicit_dtype():
    half = mlp(dtype=torch.float16)
    im = tfl.DirectInfluence(half, F.cross_entropy, 0.1, dtype=torch.float64, second_order="gauss_newton").fit((X.half(), Y))
    reference = tfl.DirectInfluence(half.double(), F.cross_entropy, 0.1, second_order="gauss_newton").fit((X.half().double(), Y))
    got, expected = im.influences(XT, YT, X, Y), reference.influences(XT, YT, X, Y)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)  # the same float64 arithmetic


def test_a_generator_is_fine_for_one_pass_top_k():
    im = _fitted()
    from_generator = im.top_k(XT, YT, _generator(), k=3)
    from_tensors = im.top_k(XT, YT, (X, Y), k=3)
    assert torch.equal(from_generator.helpful_indices, from_tensors.helpful_indices)


def test_every_data_form_gives_the_same_influences():
    im = tfl.DirectInfluence(mlp(), F.cross_entropy, 0.1, second_order="gauss_newton")
    forms = {
        "pair": (X, Y),
        "loader": loader(X, Y, 7),
        "dataset": TensorDataset(X, Y),
        "list of batches": [(X[:13], Y[:13]), (X[13:], Y[13:])],
        "drop-in map dataset": _MapDataset(),
    }
    results = {name: im.fit(data).influences(XT, YT, X, Y) for name, data in forms.items()}
    for name, value in results.items():
        assert torch.allclose(value, results["pair"], rtol=1e-10, atol=1e-13), name


class _MapDataset(Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return X[i], Y[i]


def test_integer_token_inputs_with_an_embedding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6), nn.Flatten(), nn.Linear(6 * 5, 3)).double().eval()
    tokens = torch.randint(0, 20, (30, 5))
    labels = torch.randint(0, 3, (30,))
    im = tfl.DirectInfluence(model, F.cross_entropy, 0.1, second_order="gauss_newton").fit(DataLoader(TensorDataset(tokens, labels), 8))
    got = im.grads(tokens[:4], labels[:4])
    for i in range(4):  # per-sample gradients against plain autograd, one sample at a time
        model.zero_grad()
        F.cross_entropy(model(tokens[i:i + 1]), labels[i:i + 1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(got[i], expected, rtol=1e-12, atol=1e-14)
    scores = im.influences(tokens[:3], labels[:3], tokens, labels)
    assert scores.shape == (3, 30) and bool(torch.isfinite(scores).all())
