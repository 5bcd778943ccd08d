"""Solvers in a projected gradient space against explicit float64 formulas.

The references here never call the library's gradient code: per-sample
gradients come from ``torch.func`` (vmap of grad) on the model itself, layer
inputs and output gradients from that same gradient (for one position per
sample, a layer's bias gradient is its output gradient).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import torchfluence as tfl
from torchfluence import projected_space as projected
from torchfluence.capture import find_layers
from torchfluence._functional import ModelFunctions

LOSS = F.mse_loss


def per_sample_grads(model, loss, x, y):
    """(n, p) float64 per-sample gradients of loss(model(x_i), y_i), parameters in named order."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi, yi):
        return loss(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)


@pytest.fixture(scope="module")
def problem():
    """A 5-4-3 tanh MLP (p = 39) with MSE, 120 training and 7 test points, float64.

    MSE keeps the empirical Fisher of full rank (with cross-entropy the last layer's
    gradients sum to zero over the classes, so the Fisher is singular there).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(120, 5, dtype=torch.float64), torch.randn(120, 3, dtype=torch.float64)
    xt, yt = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    g, gt = per_sample_grads(model, LOSS, x, y), per_sample_grads(model, LOSS, xt, yt)
    return model, x, y, xt, yt, g, gt


def layer_matrices(model, x, g):
    """Per layer: inputs a (n, d_in + 1) with the bias' 1, per-sample gradients G (n, d_out, d_in + 1)."""
    first, second = model[0], model[2]
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    hidden = torch.tanh(first(x)).detach()
    out = []
    start = 0
    for layer, a in ((first, torch.cat([x, ones], 1)), (second, torch.cat([hidden, ones], 1))):
        d_out, d_in = layer.weight.shape
        w = g[:, start:start + d_out * d_in].reshape(-1, d_out, d_in)
        b = g[:, start + d_out * d_in:start + d_out * d_in + d_out]
        out.append((a, torch.cat([w, b.unsqueeze(-1)], dim=-1)))
        start += d_out * d_in + d_out
    return out


def kfac_scores(train_layers, test_layers, projections, eigenvalue_correction=False, reg=0.0):
    """K-FAC / EK-FAC scores in the space of per-layer projections (P_out, P_in), explicitly.

    For one position per sample, S = E[g g^T] with g the bias column of G, A = E[a a^T];
    projected: S' = P_out S P_out^T, A' = P_in A P_in^T and Phi = P_out G P_in^T.
    """
    total = 0
    for (a, G), (at, Gt), (p_out, p_in) in zip(train_layers, test_layers, projections):
        n = a.shape[0]
        gvec = G[..., -1]
        A = p_in @ (a.T @ a / n) @ p_in.T
        S = p_out @ (gvec.T @ gvec / n) @ p_out.T
        phi, phit = p_out @ G @ p_in.T, p_out @ Gt @ p_in.T
        l_a, q_a = torch.linalg.eigh(A)
        l_s, q_s = torch.linalg.eigh(S)
        rot, rott = q_s.T @ phi @ q_a, q_s.T @ phit @ q_a
        lam = rot.square().mean(0) if eigenvalue_correction else torch.outer(l_s, l_a)
        total = total + torch.einsum("toi,noi->tn", rott / (lam + reg), rot)
    return total


def test_direct_with_square_projector_equals_unprojected_empirical_fisher(problem):
    model, x, y, xt, yt, g, gt = problem
    p = g.shape[1]
    fisher = g.T @ g / g.shape[0]
    exact = gt @ torch.linalg.solve(fisher, g.T)
    P = tfl.DenseProjector(p, p, seed=3)  # square Gaussian: invertible with probability one
    im = tfl.DirectInfluence(model, LOSS, 0.0, projector=P).fit((x, y))
    assert im.num_params == p and im.second_order == "fisher"
    got = im.influences(xt, yt, x, y)
    # P^T (P F P^T)^-1 P = F^-1 exactly; in float64 the two solves differ by rounding times
    # the condition numbers: cond(F) ~ 1e3 here and cond(P F P^T) ~ 1e6 (a Gaussian P has
    # cond(P) ~ p), so ~1e-16 * 1e6 = 1e-10 relative.
    assert float((got - exact).norm() / exact.norm()) < 1e-7
    # The projected gradients are P g (the same matrix product, summed in pieces).
    assert torch.allclose(im.grads(x, y), g @ P.matrix().T, rtol=0, atol=1e-13)


@pytest.mark.parametrize("correction", [False, True])
def test_kfac_with_kronecker_projection_matches_explicit_formula(problem, correction):
    model, x, y, xt, yt, g, gt = problem
    train_layers, test_layers = layer_matrices(model, x, g), layer_matrices(model, xt, gt)
    cls = tfl.EkfacInfluence if correction else tfl.KfacInfluence
    reg = 1e-3 if correction else 0.0
    for k_out, k_in in ((100, 100), (2, 3)):  # square invertible factors; then a real reduction
        spec = tfl.KroneckerProjection(k_out, k_in, seed=7)
        im = cls(model, LOSS, reg, projector=spec, fisher="empirical").fit((x, y))
        got = im.influences(xt, yt, x, y)
        projectors = spec.projectors(find_layers(im.functions)[0])
        factors = [p.factors(torch.float64) for p in projectors]
        expected = kfac_scores(train_layers, test_layers, factors, correction, reg)
        # Float64 eigendecompositions of 4x4..6x6 factors with condition numbers below ~1e4.
        assert float((got - expected).norm() / expected.norm()) < 1e-9, (k_out, k_in)
        if (k_out, k_in) == (100, 100) and not correction:
            # Square invertible P_out, P_in: (S' kron A')^-1 pulled back is (S kron A)^-1, so the
            # scores are those of K-FAC on the unprojected layers (no regularization to distort them).
            eye = [(torch.eye(G.shape[1], dtype=torch.float64), torch.eye(G.shape[2], dtype=torch.float64))
                   for _, G in train_layers]
            unprojected = kfac_scores(train_layers, test_layers, eye)
            assert float((got - unprojected).norm() / unprojected.norm()) < 1e-8
            library = tfl.KfacInfluence(model, LOSS, 0.0, fisher="empirical").fit((x, y))
            assert float((library.influences(xt, yt, x, y) - got).norm() / got.norm()) < 1e-8


def test_iterative_solvers_agree_with_projected_direct(problem):
    model, x, y, xt, yt, g, gt = problem
    reg = 1e-3
    for projector in (tfl.SparseJLProjector(g.shape[1], 24, seed=2), tfl.KroneckerProjection(3, 3, seed=1)):
        direct = tfl.DirectInfluence(model, LOSS, reg, projector=projector).fit((x, y))
        k = direct.num_params
        expected = direct.influences(xt, yt, x, y)
        # The projected Fisher built explicitly from torch.func gradients.
        phi = direct.grads(x, y)
        assert torch.allclose(direct.curvature, phi.T @ phi / len(x), rtol=0, atol=1e-15)
        solvers = {
            "cg": tfl.CgInfluence(model, LOSS, reg, projector=projector, rtol=1e-11),
            "arnoldi": tfl.ArnoldiInfluence(model, LOSS, reg, k, projector=projector, krylov_dimension=k),
            "nystroem": tfl.NystroemSketchInfluence(model, LOSS, reg, k, projector=projector),
        }
        for name, solver in solvers.items():
            got = solver.fit((x, y)).influences(xt, yt, x, y)
            # CG to rtol 1e-11; Arnoldi and Nystroem with rank k are exact up to float64
            # rounding amplified by cond(F + reg I) <= ~1e4.
            assert float((got - expected).norm() / expected.norm()) < 1e-8, name
    # LiSSA's Neumann series converges to the same solve (scale above the largest eigenvalue).
    projector = tfl.SparseJLProjector(g.shape[1], 8, seed=4)
    direct = tfl.DirectInfluence(model, LOSS, 0.5, projector=projector).fit((x, y))
    scale = 1.1 * float(torch.linalg.eigvalsh(direct.curvature)[-1] + 0.5)
    lissa = tfl.LissaInfluence(model, LOSS, 0.5, projector=projector, maxiter=400, scale=scale).fit((x, y))
    expected = direct.influences(xt, yt, x, y)
    # Stochastic minibatch curvature: agreement to a few percent, not to rounding.
    assert float((lissa.influences(xt, yt, x, y) - expected).norm() / expected.norm()) < 0.1


def test_cg_kfac_preconditioner_in_kronecker_space(problem):
    model, x, y, xt, yt, g, gt = problem
    spec = tfl.KroneckerProjection(2, 3, seed=1)
    direct = tfl.DirectInfluence(model, LOSS, 1e-2, projector=spec).fit((x, y))
    cg = tfl.CgInfluence(model, LOSS, 1e-2, projector=spec, preconditioner="ekfac", rtol=1e-10).fit((x, y))
    expected = direct.influences(xt, yt, x, y)
    assert float((cg.influences(xt, yt, x, y) - expected).norm() / expected.norm()) < 1e-7


def test_gradient_similarity_equals_explicit_products(problem):
    model, x, y, xt, yt, g, gt = problem
    exact = gt @ g.T
    im = tfl.GradientSimilarity(model, LOSS).fit((x, y))
    # Float64 dot products of length 39: rounding only.
    assert torch.allclose(im.influences(xt, yt, x, y), exact, rtol=0, atol=1e-13 * float(exact.abs().max()))
    assert torch.allclose(im.self_influences(x, y), g.square().sum(1), rtol=1e-12, atol=0)
    top = im.top_k(xt, yt, k=5)
    assert torch.equal(top.helpful_indices, exact.argsort(dim=1, descending=True)[:, :5])
    assert torch.equal(top.harmful_indices, exact.argsort(dim=1)[:, :5])
    assert torch.allclose(im.train_influences(xt, yt), exact, rtol=0, atol=1e-13 * float(exact.abs().max()))

    k = 4096
    projector = tfl.SparseJLProjector(g.shape[1], k, s=8, seed=11)
    got = tfl.GradientSimilarity(model, LOSS, projector=projector).fit((x, y)).influences(xt, yt, x, y)
    # Exactly the products of the projected gradients...
    P = projector.matrix()
    assert torch.allclose(got, (gt @ P.T) @ (g @ P.T).T, rtol=0, atol=1e-12 * float(exact.abs().max()))
    # ...which are within the JL error of the unprojected ones: E[<Pg, Ph>] = <g, h> and its
    # standard deviation is at most sqrt(2 / k) |g| |h| (for the SJLT as for a Gaussian
    # matrix); over 840 pairs the largest deviation stays below 5 standard deviations.
    scale = gt.norm(dim=1, keepdim=True) * g.norm(dim=1)
    assert float(((got - exact).abs() / scale).max()) < 5 * math.sqrt(2 / k)


def _models():
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4)).double()

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 5, padding_idx=0)
            self.norm = nn.LayerNorm(5)  # not a captured layer: its parameters go through torch.func
            self.head = nn.Linear(5, 3)

        def forward(self, ids):
            return self.head(self.norm(self.embed(ids)).mean(dim=1))

    tokens = Tokens().double()
    gen = torch.Generator().manual_seed(2)
    conv_data = (torch.randn(9, 2, 4, 4, dtype=torch.float64, generator=gen),
                 torch.randn(9, 4, dtype=torch.float64, generator=gen))
    ids = torch.randint(0, 11, (9, 6), generator=gen)
    ids[:, -1] = 0  # padding positions
    token_data = (ids, torch.randn(9, 3, dtype=torch.float64, generator=gen))
    return [(conv.eval(), conv_data), (tokens.eval(), token_data)]


def test_kronecker_projected_gradients_equal_dense_kronecker_projection():
    for model, (x, y) in _models():
        params = None
        if isinstance(model, nn.Sequential):
            full = per_sample_grads(model, LOSS, x, y)
        else:
            params = ["embed.weight", "head.weight", "head.bias"]  # the captured layers only
            full = per_sample_grads(model, LOSS, x, y)
            names = [n for n, _ in model.named_parameters()]
            sizes = dict((n, p.numel()) for n, p in model.named_parameters())
            offsets = dict(zip(names, torch.tensor([0] + [sizes[n] for n in names]).cumsum(0).tolist()))
            full = torch.cat([full[:, offsets[n]:offsets[n] + sizes[n]] for n in params], 1)
        spec = tfl.KroneckerProjection(2, 3, seed=5)
        functions = ModelFunctions(model, LOSS, params)
        source = projected.projected_source(functions, None, spec)
        got = source.grads(x, y)
        # Each layer: KroneckerProjector.project on the formed (d_out, d_in) gradient matrices
        # (bias as the last column; an embedding's stored (d_in, d_out) weight transposed).
        pieces = [proj.project(layer.matrices(full).flatten(1))
                  for layer, proj in zip(source.layers, source.projectors)]
        expected = torch.cat(pieces, dim=1)
        assert got.shape == (x.shape[0], sum(p.k for p in source.projectors))
        # Float64, sums of <= 16 positions: rounding only.
        assert torch.allclose(got, expected, rtol=0, atol=1e-13 * float(expected.abs().max()))


@pytest.mark.parametrize("piece_values", [1 << 24, 7])
def test_sjlt_projected_gradients_in_pieces_equal_projection_of_full_gradients(monkeypatch, piece_values):
    # 7 values per piece: every layer is projected one output row (an embedding one row) at a time.
    monkeypatch.setattr(projected, "_PIECE_VALUES", piece_values)
    for model, (x, y) in _models():
        full = per_sample_grads(model, LOSS, x, y)
        projector = tfl.SparseJLProjector(full.shape[1], 32, s=2, seed=9)
        for fused in (True, False):
            im = tfl.GradientSimilarity(model, LOSS, projector=projector, fused=fused)
            if fused:
                assert isinstance(im.source, projected.ProjectedGradients) and im.source.layers
            got = im.grads(x, y)
            expected = projector.project(full)
            # The SJLT adds the same +-1/sqrt(s) terms in another grouping: float64 rounding.
            assert torch.allclose(got, expected, rtol=0, atol=1e-13 * float(expected.abs().max())), fused


def test_per_layer_scores_in_kronecker_space(problem):
    model, x, y, xt, yt, g, gt = problem
    im = tfl.EkfacInfluence(model, LOSS, 1e-3, projector=tfl.KroneckerProjection(2, 2)).fit((x, y))
    by_layer = im.influences_by_layer(xt, yt, x, y)
    assert set(by_layer) == {"0", "2"}
    total = im.influences(xt, yt, x, y)
    assert torch.allclose(sum(by_layer.values()), total, rtol=0, atol=1e-12 * float(total.abs().max()))
    self_inf = im.self_influences(x[:10], y[:10])
    assert torch.allclose(self_inf, torch.diagonal(im.influences(x[:10], y[:10])), rtol=1e-10, atol=0)


def test_refusals(problem, tmp_path):
    model, x, y, xt, yt, g, gt = problem
    p = g.shape[1]
    P = tfl.SparseJLProjector(p, 8)
    with pytest.raises(ValueError, match="second_order='hessian' cannot be used with projector="):
        tfl.DirectInfluence(model, LOSS, 0.1, projector=P, second_order="hessian")
    with pytest.raises(ValueError, match="second_order must be"):
        tfl.DirectInfluence(model, LOSS, 0.1, second_order="fisher")
    with pytest.raises(ValueError, match=r"its p must be the number of selected parameters, 39, got p = 40"):
        tfl.DirectInfluence(model, LOSS, 0.1, projector=tfl.SparseJLProjector(p + 1, 8))
    with pytest.raises(TypeError, match="KfacInfluence needs the layer structure"):
        tfl.KfacInfluence(model, LOSS, 0.1, projector=P)
    with pytest.raises(ValueError, match="DataInf"):
        tfl.InverseHarmonicMeanInfluence(model, LOSS, 0.1, projector=P)
    with pytest.raises(ValueError, match="curvature="):
        tfl.DirectInfluence(model, LOSS, 0.1, projector=P, curvature=tfl.GaussNewton)
    with pytest.raises(TypeError, match="projector must be a torchfluence.Projector"):
        tfl.DirectInfluence(model, LOSS, 0.1, projector="sjlt")
    with pytest.raises(TypeError, match="takes no regularization"):
        tfl.GradientSimilarity(model, LOSS, regularization=0.1)
    im = tfl.DirectInfluence(model, LOSS, 0.1, projector=P).fit((x, y))
    with pytest.raises(ValueError, match="mode='perturbation'"):
        im.influences(xt, yt, x, y, mode="perturbation")
    with pytest.raises(NotImplementedError, match="cannot be saved"):
        im.save(tmp_path / "solver.safetensors")
    with pytest.raises(ValueError, match=r"factors must have shape \(n_test, 8\)"):
        im.influences_from_factors(torch.zeros(2, p, dtype=torch.float64), x, y)
    for bad, error in (({"k_out": 0, "k_in": 2}, ValueError), ({"k_out": 2.0, "k_in": 2}, TypeError),
                       ({"k_out": 2, "k_in": 2, "seed": -1}, ValueError),
                       ({"k_out": 2, "k_in": 2, "dtype": torch.float16}, TypeError)):
        with pytest.raises(error, match="KroneckerProjection"):
            tfl.KroneckerProjection(**bad)
    tokens, _ = _models()[1]
    with pytest.raises(ValueError, match="not covered: norm.weight"):
        tfl.GradientSimilarity(tokens, LOSS, projector=tfl.KroneckerProjection(2, 2))


def test_gradient_similarity_save_and_load(problem, tmp_path):
    model, x, y, xt, yt, g, gt = problem
    im = tfl.GradientSimilarity(model, LOSS).fit((x, y))
    path = im.save(tmp_path / "gs.safetensors")
    loaded = tfl.InfluenceFunctionModel.load(path, model, LOSS, train_data=(x, y))
    assert type(loaded) is tfl.GradientSimilarity
    assert torch.equal(loaded.influences(xt, yt, x, y), im.influences(xt, yt, x, y))


def test_kfac_kronecker_projection_with_positions_and_an_embedding():
    """Projected K-FAC where a layer has several positions (an embedding's tokens, padding among them).

    Reference: each layer's inputs and output gradients by autograd on the model's module
    outputs (the sum of per-sample losses gives each sample's own output gradients, the
    samples being independent), projected and contracted in float64.
    """
    model, (ids, y) = _models()[1]
    params = ["embed.weight", "head.weight", "head.bias"]
    spec = tfl.KroneckerProjection(2, 3, seed=4)
    im = tfl.KfacInfluence(model, LOSS, 0.0, params=params, fisher="empirical", projector=spec).fit((ids, y))
    got = im.influences(ids[:4], y[:4], ids, y)

    outputs = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: outputs.update({name: (i[0], o)}))
             for name in ("embed", "head")]
    out = model(ids)
    for h in hooks:
        h.remove()
    total = sum(LOSS(out[i:i + 1], y[i:i + 1]) for i in range(len(y)))
    g_embed, g_head = torch.autograd.grad(total, [outputs["embed"][1], outputs["head"][1]])
    proj_embed, proj_head = spec.projectors(find_layers(ModelFunctions(model, LOSS, params))[0])
    # Embedding: input t is onehot(id_t) (d_in = 11); padding positions give the weight no
    # gradient, so they count in neither factor.
    p_out, p_in = proj_embed.factors()
    kept = (ids != 0).unsqueeze(-1)
    pa_embed, pg_embed = p_in.T[ids] * kept, (g_embed.detach() @ p_out.T) * kept
    p_out, p_in = proj_head.factors()
    a_head = torch.cat([outputs["head"][0].detach(), torch.ones(len(y), 1, dtype=torch.float64)], 1)
    pa_head, pg_head = (a_head @ p_in.T)[:, None], (g_head.detach() @ p_out.T)[:, None]
    expected = 0
    for pa, pg in ((pa_embed, pg_embed), (pa_head, pg_head)):
        n, T = pa.shape[:2]
        A = torch.einsum("nti,ntj->ij", pa, pa) / n
        S = torch.einsum("nto,ntp->op", pg, pg) / (n * T)
        phi = torch.einsum("nto,nti->noi", pg, pa)
        expected = expected + torch.einsum("toi,noi->tn", torch.linalg.solve(S, phi[:4]) @ torch.linalg.inv(A), phi)
    # Float64; 2x2 and 3x3 factors: rounding only.
    assert float((got - expected).norm() / expected.norm()) < 1e-10
