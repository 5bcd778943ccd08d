"""Prepared test factors are reused only for the same query tensors on an unchanged solver."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfluence as tfl

from .digits import loader

REG = 1.0  # above the random MLP's most negative Hessian eigenvalue: H + REG I is positive definite


@pytest.fixture
def setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    xt, yt = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    return model, x, y, xt, yt


def _counting(im):
    """Counts the solver's query preparations."""
    calls = []
    prepare = im._prepare_factors
    im._prepare_factors = lambda *a: calls.append(1) or prepare(*a)
    return calls


@pytest.mark.parametrize("cls", [tfl.DirectInfluence, tfl.EkfacInfluence, tfl.CgInfluence])
def test_train_influences_then_top_k_solve_the_queries_once(setting, cls):
    model, x, y, xt, yt = setting
    im = cls(model, F.cross_entropy, REG).fit(loader(x, y, 16))
    calls = _counting(im)
    scores = im.train_influences(xt, yt)
    top = im.top_k(xt, yt, k=3)
    again = im.influences(xt, yt, x, y)
    assert len(calls) == 1
    fresh = cls(model, F.cross_entropy, REG).fit(loader(x, y, 16))
    assert torch.equal(scores, fresh.train_influences(xt, yt))
    assert torch.equal(again, scores)
    assert torch.equal(top.helpful_values, fresh.top_k(xt, yt, k=3).helpful_values)


def test_any_change_prepares_again_and_gives_the_fresh_result(setting):
    model, x, y, xt, yt = setting
    im = tfl.DirectInfluence(model, F.cross_entropy, REG).fit(loader(x, y, 16))
    calls = _counting(im)

    def check(query, labels, expected_calls, solver=im, reference=None):
        got = solver.train_influences(query, labels)
        assert len(calls) == expected_calls
        reference = reference or tfl.DirectInfluence(model, F.cross_entropy, solver.regularization).fit(
            loader(x, y, 16))
        assert torch.equal(got, reference.train_influences(query.clone(), labels.clone()))

    check(xt, yt, 1)
    check(xt, yt, 1)  # the same tensors: reused
    check(xt.clone(), yt, 2)  # equal values, another tensor: prepared again (identity, not values)
    xt[0, 0] += 1.0  # modified in place: its version counter changed
    check(xt, yt, 3)
    check(xt[:5], yt[:5], 4)  # a view of other shape
    im.with_regularization(2 * REG)  # the settings changed
    check(xt, yt, 5)
    im.fit(loader(x, y, 16))  # a new fit
    check(xt, yt, 6)


def test_a_parameter_updated_in_place_is_a_new_state(setting):
    model, x, y, xt, yt = setting
    im = tfl.EkfacInfluence(model, F.cross_entropy, REG).fit(loader(x, y, 16))
    calls = _counting(im)
    im.train_influences(xt, yt)
    with torch.no_grad():
        model[0].weight.mul_(1.01)  # e.g. one more optimizer step
    im.train_influences(xt, yt)
    assert len(calls) == 2


def test_opting_out_and_forgetting(setting):
    model, x, y, xt, yt = setting
    im = tfl.DirectInfluence(model, F.cross_entropy, REG).fit(loader(x, y, 16))
    calls = _counting(im)
    im.train_influences(xt, yt)
    assert im._query_cache.holds
    im.forget_queries()
    assert not im._query_cache.holds
    im.train_influences(xt, yt)
    assert len(calls) == 2
    im.cache_queries = False
    im.train_influences(xt, yt)
    im.train_influences(xt, yt)
    assert len(calls) == 4 and not im._query_cache.holds


def test_the_old_entry_is_dropped_before_new_queries_are_prepared(setting):
    """Two query sets are never held at once."""
    model, x, y, xt, yt = setting
    im = tfl.DirectInfluence(model, F.cross_entropy, REG).fit(loader(x, y, 16))
    im.train_influences(xt, yt)
    seen = []
    prepare = im._prepare_factors
    im._prepare_factors = lambda *a: seen.append(im._query_cache.holds) or prepare(*a)
    im.train_influences(xt.clone(), yt)
    assert seen == [False]


def test_dict_batches_are_keyed_by_their_tensors(setting):
    model, x, y, xt, yt = setting

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, features):
            return self.net(features)

    kw = Keyword()
    im = tfl.DirectInfluence(kw, lambda out, batch: F.cross_entropy(out, batch["labels"]), REG)
    batches = [{"features": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 40, 8)]
    im.fit(batches)
    calls = _counting(im)
    query = {"features": xt, "labels": yt}
    first = im.train_influences(*tfl.split_batch(query))
    second = im.train_influences(*tfl.split_batch(query))  # new Batch objects, the same tensors
    assert len(calls) == 1 and torch.equal(first, second)
    yt[0] = (yt[0] + 1) % 3  # the labels changed in place
    im.train_influences(*tfl.split_batch(query))
    assert len(calls) == 2


def test_a_solver_with_a_cached_query_set_pickles(setting):
    """dask and multiprocessing pickle solvers: the cache travels empty (weak references do not pickle)."""
    import pickle

    model, x, y, xt, yt = setting
    im = tfl.DirectInfluence(model, F.cross_entropy, REG).fit(loader(x, y, 16))
    scores = im.train_influences(xt, yt)
    assert im._query_cache.holds
    copy = pickle.loads(pickle.dumps(im))
    assert not copy._query_cache.holds
    assert torch.equal(copy.train_influences(xt, yt), scores)
