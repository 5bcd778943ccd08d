"""Per-token scores (InfluenceFunctionModel.per_token_influences), float64.

References: the scores summed over tokens are the influences; on a model whose positions
do not interact, each token's score is its own loss term's gradient (torch.func) dotted with
the preconditioned query; on a transformer, each position's score is the gradient of a
perturbation of every captured layer applied at that position alone (autograd on a
model with hooks, not the capture).
"""

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from tests import test_transformers as tiny
from tests.test_hf_models import REG, build, quiet


def assert_sums_to_influences(im, xt, yt, x, y) -> Tensor:
    per_token = im.per_token_influences(xt, yt, x, y)
    assert per_token.shape == (xt.shape[0], x.shape[0], x.shape[1])
    # The same float64 terms, summed over positions before or after the contraction.
    torch.testing.assert_close(per_token.sum(dim=2), im.influences(xt, yt, x, y), rtol=1e-10, atol=1e-13)
    return per_token


@pytest.mark.parametrize("solver", [tfl.EkfacInfluence, tfl.KfacInfluence])
def test_per_token_scores_sum_to_the_influences_on_gpt2(solver):
    model, loss, data = build("gpt2")
    x, y = data(10, seed=3)
    xt, yt = data(3, seed=4)
    im = quiet(solver, model, loss, REG, fisher="empirical").fit((x, y))
    per_token = assert_sums_to_influences(im, xt, yt, x, y)
    factors = im.influence_factors(xt, yt)
    torch.testing.assert_close(im.per_token_influences_from_factors(factors, x, y), per_token, rtol=1e-10,
                               atol=1e-13)


def test_per_token_scores_sum_to_the_influences_on_a_transformer_with_fused_cg():
    model = tiny.make_model(blocks=2)
    x, y = tiny.make_data(10, seed=1)
    xt, yt = tiny.make_data(3, seed=2)
    ekfac = quiet(tfl.EkfacInfluence, model, tiny.lm_loss, REG, fisher="empirical").fit((x, y))
    assert_sums_to_influences(ekfac, xt, yt, x, y)
    cg = tfl.CgInfluence(model, tiny.lm_loss, REG, params=ekfac.functions.names, second_order="gauss_newton")
    cg.fit((x, y))
    assert_sums_to_influences(cg, xt, yt, x, y)


def test_dict_batches_give_the_per_token_scores_of_the_pair_form():
    model, loss, data = build("gpt2")
    x, y = data(6, seed=3)
    xt, yt = data(2, seed=4)
    im = quiet(tfl.EkfacInfluence, model, loss, REG, fisher="empirical").fit((x, y))
    expected = im.per_token_influences(xt, yt, x, y)
    got = im.per_token_influences(*tfl.split_batch({"input_ids": xt, "labels": yt}),
                                  *tfl.split_batch({"input_ids": x, "labels": y}))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


# -- a model whose positions do not interact: per-token = each token's own loss term ------------------

class TokenMLP(nn.Module):
    """Embedding, a tanh hidden layer and a head, applied to each token on its own."""

    def __init__(self, vocab: int = 11, width: int = 6):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.hidden, self.head = nn.Linear(width, 2 * width), nn.Linear(2 * width, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(self.tok(ids))))


def token_loss_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Gradient of each token's term of the mean-over-tokens loss, CE_t / N_j, (n, T, p), by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def term(p, ids, targets, t):
        logits = functional_call(model, p, (ids[None],))[0]  # (T, V)
        count = (targets != -100).sum()
        ce = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")
        at_t = (torch.arange(targets.shape[0]) == t) & (targets != -100)  # a mask: vmap cannot index by t
        return (ce * at_t).sum() / count

    positions = torch.arange(x.shape[1])
    g = vmap(vmap(grad(term), in_dims=(None, None, None, 0)), in_dims=(None, 0, 0, None))(params, x, y, positions)
    return torch.cat([g[k].flatten(2) for k in params], dim=2)


@pytest.mark.parametrize("solver", [tfl.EkfacInfluence, tfl.KfacInfluence, tfl.DirectInfluence])
def test_per_token_scores_equal_each_tokens_loss_term_where_positions_do_not_interact(solver):
    torch.manual_seed(0)
    model = TokenMLP().double().eval()
    x, y = tiny.make_data(8, seed=5)
    x, y = x % 11, torch.where(y == -100, y, y % 11)
    xt, yt = x[:3].flip(1), y[:3]
    kwargs = {"fisher": "empirical"} if solver is not tfl.DirectInfluence else {"second_order": "gauss_newton"}
    im = solver(model, tiny.lm_loss, REG, **kwargs).fit((x, y))
    factors = im.influence_factors(xt, yt)  # (n_test, p) in named_parameters order
    expected = torch.einsum("qp,ntp->qnt", factors, token_loss_grads(model, x, y))
    got = assert_sums_to_influences(im, xt, yt, x, y)
    # Same float64 products in another order; masked tokens are exactly 0 on both sides.
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    assert bool((got[:, y == -100] == 0).all())


# -- a transformer: each position's score is a perturbation of the layers at that position alone -------

def position_grads(model: nn.Module, names: list, x: Tensor, y: Tensor) -> dict:
    """{layer: (n, T, d_out, d_in[+1])} gradients of each sequence's loss w.r.t. a perturbation of the layer's
    weight (and bias) applied at position t only; they sum over t to the layer's per-sample gradient."""
    modules = dict(model.named_modules())
    n, T = x.shape
    out = {name: [] for name in names}
    for j in range(n):
        perturb, handles = {}, []
        for name in names:
            m = modules[name]
            if isinstance(m, nn.Embedding):
                e = torch.zeros(T, m.num_embeddings, m.embedding_dim, dtype=torch.float64, requires_grad=True)
                hook = lambda mod, inp, o, e=e: o + e[torch.arange(T), inp[0][0]]  # noqa: E731
            else:
                e = torch.zeros(T, m.out_features, m.in_features + 1, dtype=torch.float64, requires_grad=True)
                hook = lambda mod, inp, o, e=e: o + torch.einsum(  # noqa: E731
                    "toi,nti->nto", e, F.pad(inp[0], (0, 1), value=1.0))
            perturb[name] = e
            handles.append(m.register_forward_hook(hook))
        try:
            loss = tiny.lm_loss(model(x[j:j + 1]), y[j:j + 1])
            grads = torch.autograd.grad(loss, list(perturb.values()))
        finally:
            for h in handles:
                h.remove()
        for name, g in zip(names, grads):
            out[name].append(g)
    return {name: torch.stack(g) for name, g in out.items()}


def test_per_token_scores_on_a_transformer_equal_per_position_perturbations():
    model = tiny.make_model(blocks=1)
    x, y = tiny.make_data(5, seed=1)
    xt, yt = tiny.make_data(2, seed=2)
    im = quiet(tfl.EkfacInfluence, model, tiny.lm_loss, REG, fisher="empirical").fit((x, y))
    layers = {layer.name: layer for layer in im.layers}
    grads = position_grads(model, list(layers), x, y)
    factors = im.influence_factors(xt, yt)
    expected = torch.zeros(2, 5, x.shape[1], dtype=torch.float64)
    for name, layer in layers.items():
        q = layer.matrices(factors)  # (n_test, d_out, d_in_total); an embedding's (d_out, V)
        g = grads[name] if not layer.index else grads[name].transpose(2, 3)
        expected += torch.einsum("qoi,ntoi->qnt", q, g)
    got = assert_sums_to_influences(im, xt, yt, x, y)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_per_token_scores_refuse_uncaptured_parameters_and_torch_func_gradients():
    model = tiny.make_model(blocks=1)
    x, y = tiny.make_data(4, seed=1)
    with pytest.raises(ValueError, match=r"not captured: blocks.0.ln1.weight"):
        tfl.CgInfluence(model, tiny.lm_loss, REG).fit((x, y)).per_token_influences(x, y)
    with pytest.raises(ValueError, match=r"fused=False"):
        tfl.DirectInfluence(model, tiny.lm_loss, REG, fused=False, params=["head.weight"]).fit(
            (x, y)).per_token_influences(x, y)
