"""K-FAC, EK-FAC, Arnoldi, Nystrom and preconditioned CG against dense float64 references."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch import nn

from .conftest import DEVICES
from .digits import cnn, digits, exact_hessian, exact_influences, loader, mlp, rel_error, train

REG = 0.05
LOSS = F.cross_entropy


@pytest.fixture(scope="module")
def problem():
    x, y, xt, yt = digits(n_train=200, n_test=20)
    model = train(mlp(hidden=8), x, y)
    return model, x, y, xt, yt


@pytest.fixture(scope="module")
def image_problem():
    x, y, xt, yt = digits(n_train=150, n_test=10, image=True)
    return train(cnn(), x, y, steps=150), x, y, xt, yt


def output_grads(model, x, y):
    """Per-sample d loss_i / d outputs of every Linear/Conv2d, by autograd one sample at a time."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    acts, grads = {id(m): [] for m in layers}, {id(m): [] for m in layers}
    for i in range(len(x)):
        outs = []

        def record(m, inp, out):
            acts[id(m)].append(inp[0].detach())
            outs.append(out)

        hooks = [m.register_forward_hook(record) for m in layers]
        loss = LOSS(model(x[i:i + 1]), y[i:i + 1])
        for h in hooks:
            h.remove()
        for m, g in zip(layers, torch.autograd.grad(loss, outs)):
            grads[id(m)].append(g.detach())
    return layers, acts, grads


def reference_kfac(model, x, y, eigenvalue_correction: bool):
    """Dense float64 (E)K-FAC matrix, block-diagonal over the MLP's Linear layers, in parameter order.

    Built from the textbook definitions with explicit Kronecker products:
    A = mean a a^T (bias as a constant 1), S = mean g g^T, block = S (x) A;
    EK-FAC replaces the eigenvalues in the basis Q_S (x) Q_A by the mean squared
    projections of the per-sample gradients (George et al. 2018).
    """
    layers, acts, grads = output_grads(model, x, y)
    blocks = []
    for m in layers:
        a = torch.cat([torch.cat(acts[id(m)]), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # (n, d_in + 1)
        g = torch.cat(grads[id(m)])  # (n, d_out)
        a_cov, s_cov = a.T @ a / len(x), g.T @ g / len(x)
        block = torch.kron(s_cov, a_cov)
        if eigenvalue_correction:
            basis = torch.kron(torch.linalg.eigh(s_cov)[1], torch.linalg.eigh(a_cov)[1])
            per_sample = torch.stack([torch.outer(gi, ai).reshape(-1) for gi, ai in zip(g, a)])  # vec(g a^T)
            block = basis @ torch.diag((per_sample @ basis).square().mean(0)) @ basis.T
        # Reorder from the (d_out, d_in + 1) matrix layout to [weight (d_out * d_in), bias (d_out)].
        d_out, d_in = m.weight.shape
        idx = torch.arange(d_out * (d_in + 1)).view(d_out, d_in + 1)
        order = torch.cat([idx[:, :d_in].reshape(-1), idx[:, d_in]])
        blocks.append(block[order][:, order])
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("correction", [False, True], ids=["kfac", "ekfac"])
def test_kfac_solve_matches_dense_reference(problem, correction):
    model, x, y, xt, yt = problem
    cls = tfl.EkfacInfluence if correction else tfl.KfacInfluence
    im = cls(model, LOSS, REG, fisher="empirical", dtype=torch.float64).fit(loader(x, y, 64))
    matrix = reference_kfac(model, x, y, correction)
    v = torch.randn(5, matrix.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(matrix + REG * torch.eye(matrix.shape[0], dtype=torch.float64), v.T).T
    # Both are float64 solves of a matrix with condition number <~ 1e3: 1e-9 is rounding.
    assert rel_error(im.solve(v), expected) < 1e-9


def test_ekfac_true_fisher_tracks_exact_influence(problem):
    model, x, y, xt, yt = problem
    exact = exact_influences(model, LOSS, REG, x, y, xt, yt)
    got = tfl.EkfacInfluence(model, LOSS, REG, fisher_samples=4, dtype=torch.float64).fit(loader(x, y)).influences(
        xt, yt, x, y)
    pearson = torch.corrcoef(torch.stack([got.flatten(), exact.flatten()]))[0, 1]
    # A fidelity floor, not an identity: EK-FAC drops cross-layer curvature and the
    # Hessian's non-Gauss-Newton part; on this model it measures ~0.95.
    assert pearson > 0.85


def test_ekfac_on_conv_net_matches_reference_solve(image_problem):
    model, x, y, xt, yt = image_problem
    im = tfl.EkfacInfluence(model, LOSS, REG, fisher="empirical", dtype=torch.float64).fit(loader(x, y))
    scores = im.influences(xt, yt, x, y)
    by_layer = im.influences_by_layer(xt, yt, x, y)
    assert set(by_layer) == {"0", "4"}
    # The layer split is a regrouping of the same float64 sums.
    torch.testing.assert_close(sum(by_layer.values()), scores, rtol=1e-10, atol=1e-12)
    # The solve is exact for its own matrix: check (F + reg I) solve(v) = v through the
    # per-layer eigendecomposition.
    v = torch.randn(3, im.num_params, dtype=torch.float64)
    f = im.factors["0"]
    u = im.solve(v)
    layer = im.layers[0]
    rotated = f.gradient_eigenvectors.T @ layer.matrices(u) @ f.activation_eigenvectors
    back = f.gradient_eigenvectors @ (rotated * (f.eigenvalues + REG)) @ f.activation_eigenvectors.T
    torch.testing.assert_close(back, layer.matrices(v), rtol=1e-9, atol=1e-10)


def top_eigen_reference(h, rank, reg, complement):
    values, vectors = torch.linalg.eigh(h)
    keep = values.abs().argsort(descending=True)[:rank]
    u, l = vectors[:, keep], values[keep]
    inverse = u @ torch.diag(1 / (l + reg)) @ u.T
    if complement:
        inverse = inverse + (torch.eye(h.shape[0], dtype=h.dtype) - u @ u.T) / reg
    return inverse


@pytest.mark.parametrize("complement", ["regularization", "drop"])
def test_arnoldi_matches_top_eigenspace(problem, complement):
    model, x, y, xt, yt = problem
    h = exact_hessian(model, LOSS, x, y)
    im = tfl.ArnoldiInfluence(model, LOSS, REG, rank=8, complement=complement, tol=1e-10, krylov_dimension=200,
                              dtype=torch.float64).fit(loader(x, y))
    assert im.ritz_residual <= 1e-10
    v = torch.randn(4, im.num_params, dtype=torch.float64)
    expected = v @ top_eigen_reference(h, 8, REG, complement == "regularization")
    # Ritz pairs converged to 1e-10 relative residual; the top-8 spectrum is well separated.
    assert rel_error(im.solve(v), expected) < 1e-6


def test_arnoldi_full_rank_is_exact(problem):
    model, x, y, xt, yt = problem
    exact = exact_influences(model, LOSS, REG, x, y, xt, yt)
    p = sum(q.numel() for q in model.parameters())
    im = tfl.ArnoldiInfluence(model, LOSS, REG, rank=p, krylov_dimension=p, krylov_block=64, dtype=torch.float64)
    got = im.fit(loader(x, y)).influences(xt, yt, x, y)
    # The Krylov space is the whole space: an exact eigendecomposition in float64.
    assert rel_error(got, exact) < 1e-8


def test_nystroem_full_rank_is_exact_on_gauss_newton(problem):
    model, x, y, xt, yt = problem
    p = sum(q.numel() for q in model.parameters())
    direct = tfl.DirectInfluence(model, LOSS, REG, second_order="gauss_newton", dtype=torch.float64).fit(loader(x, y))
    sketch = tfl.NystroemSketchInfluence(model, LOSS, REG, rank=p, second_order="gauss_newton",
                                         dtype=torch.float64).fit(loader(x, y))
    # Rank p reproduces a PSD matrix up to the stabilising shift (~1e-13 relative).
    assert rel_error(sketch.influences(xt, yt, x, y), direct.influences(xt, yt, x, y)) < 1e-7


def test_nystroem_low_rank_matches_formula(problem):
    model, x, y, xt, yt = problem
    im = tfl.NystroemSketchInfluence(model, LOSS, REG, rank=12, second_order="gauss_newton", dtype=torch.float64)
    im.fit(loader(x, y))
    u, l = im.low_rank.eigenvectors, im.low_rank.eigenvalues
    torch.testing.assert_close(u @ u.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-10)
    assert bool((l >= 0).all())
    v = torch.randn(3, im.num_params, dtype=torch.float64)
    approx = (u.T * l) @ u + REG * torch.eye(im.num_params, dtype=torch.float64)
    torch.testing.assert_close(im.solve(v), torch.linalg.solve(approx, v.T).T, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("preconditioner", ["ekfac", "kfac", "nystroem"])
def test_preconditioned_cg_converges_faster(problem, preconditioner):
    model, x, y, xt, yt = problem
    reg = 0.01  # a harder system than REG, so iteration counts differ clearly
    exact = exact_influences(model, LOSS, reg, x, y, xt, yt)
    # Independent CG: one Krylov space per column shows the preconditioner's effect on its own.
    plain = tfl.CgInfluence(model, LOSS, reg, rtol=1e-8, dtype=torch.float64, block=False).fit(loader(x, y))
    pre = tfl.CgInfluence(model, LOSS, reg, rtol=1e-8, preconditioner=preconditioner, dtype=torch.float64,
                          block=False)
    pre.fit(loader(x, y))
    got = pre.influences(xt, yt, x, y)
    plain.influences(xt, yt, x, y)
    assert rel_error(got, exact) < 1e-6  # rtol 1e-8 times cond(H + reg I) ~ 1e2
    # Measured: about 0.75x the plain count for (E)K-FAC and 0.5x for Nystrom r=32.
    assert pre.last_solve_info.iterations.float().mean() < 0.85 * plain.last_solve_info.iterations.float().mean()
    blocked = tfl.CgInfluence(model, LOSS, reg, rtol=1e-8, preconditioner=preconditioner, dtype=torch.float64)
    assert rel_error(blocked.fit(loader(x, y)).influences(xt, yt, x, y), exact) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_ekfac_device_agreement(problem, device):
    model, x, y, xt, yt = problem
    cpu = tfl.EkfacInfluence(model, LOSS, REG, fisher="empirical", dtype=torch.float64).fit(loader(x, y))
    moved = tfl.EkfacInfluence(model.to(device), LOSS, REG, fisher="empirical", dtype=torch.float64)
    got = moved.fit(loader(x.to(device), y.to(device))).influences(xt.to(device), yt.to(device), x.to(device),
                                                                     y.to(device))
    model.cpu()
    # Same float64 arithmetic on another backend: rounding-level differences.
    assert rel_error(got.cpu(), cpu.influences(xt, yt, x, y)) < 1e-9


# -- bad input --------------------------------------------------------------------------------------

class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.embed = nn.Embedding(10, 4)

    def forward(self, x):
        return self.norm(x)[:, :10]


def test_kfac_leaves_out_unsupported_modules_by_default_and_rejects_them_when_selected():
    with pytest.warns(UserWarning, match=r"covers 1 captured layers \(Embedding; 40 values\) and leaves out 128 "
                                         r"values: LayerNorm \(not a captured layer type\): 2 parameter"):
        im = tfl.EkfacInfluence(NoLayers(), LOSS, REG)
    assert im.functions.names == ["embed.weight"]
    with pytest.raises(ValueError, match=r"LayerNorm.*type not registered"):
        tfl.EkfacInfluence(NoLayers(), LOSS, REG, params=["norm.weight", "embed.weight"])
    model = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten(), nn.Linear(2, 2))
    with pytest.warns(UserWarning, match=r"Conv2d \(groups=2 \(only 1 is supported\)\)"):
        assert tfl.KfacInfluence(model, LOSS, REG).functions.names == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match=r"0.weight \(Conv2d: groups=2"):
        tfl.KfacInfluence(model, LOSS, REG, params=["0.weight", "2.weight"])
    tfl.KfacInfluence(model, LOSS, REG, params=["2.weight", "2.bias"])  # restricting params works


def test_bad_arguments_are_named(problem):
    model = problem[0]
    p = sum(q.numel() for q in model.parameters())
    with pytest.raises(ValueError, match=rf"rank must be at most the number of parameters \({p}\), got {p + 1}"):
        tfl.ArnoldiInfluence(model, LOSS, REG, rank=p + 1)
    with pytest.raises(ValueError, match="regularization must be a finite number >= 0, got -1"):
        tfl.EkfacInfluence(model, LOSS, -1.0)
    with pytest.raises(ValueError, match="complement='regularization' divides by the regularization"):
        tfl.ArnoldiInfluence(model, LOSS, 0.0, rank=3)
    with pytest.raises(ValueError, match="regularization must be > 0"):
        tfl.NystroemSketchInfluence(model, LOSS, 0.0, rank=3)
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        tfl.CgInfluence(model, LOSS, REG, preconditioner="ilu")
    with pytest.raises(ValueError, match="fisher must be 'true', 'exact' or 'empirical', got 'sampled'"):
        tfl.EkfacInfluence(model, LOSS, REG, fisher="sampled")
    # Label smoothing is not a likelihood: no targets to draw (a plain cross-entropy lambda is recognised).
    with pytest.raises(ValueError, match="not one torchfluence knows how to sample"):
        tfl.EkfacInfluence(model, lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1), REG).fit(
            loader(*problem[1:3]))


def test_non_finite_inputs_name_the_sample_and_overflow_names_the_layer(problem):
    model, x, y, _, _ = problem
    bad = x.clone()
    bad[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"train_data inputs: 1 value\(s\) are NaN or inf \(first at sample 3\)"):
        tfl.EkfacInfluence(model, LOSS, REG, fisher="empirical").fit(loader(bad, y))
    huge = x.clone().float()
    huge[3] = 1e30  # finite, but its square overflows float32 in the activation covariance
    with pytest.raises(ValueError, match=r"layer '0': the activation covariance A has NaN or inf"):
        tfl.EkfacInfluence(model.float(), LOSS, REG, fisher="empirical", dtype=torch.float32).fit(loader(huge, y))


def test_singular_kfac_needs_regularization(problem):
    model, x, y, _, _ = problem
    zero_input = torch.zeros_like(x)  # A is rank one (only the bias column): singular factors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="singular; use regularization > 0"):
            tfl.KfacInfluence(model, LOSS, 0.0, fisher="empirical").fit(loader(zero_input, y))


def test_sampled_fisher_converges_to_exact_expectation(problem):
    # An untrained model: its spread-out predictions keep the Monte Carlo error light-tailed
    # (a confident model draws rare classes with large gradients, and converges slowly).
    _, x, y, _, _ = problem
    model = mlp(hidden=8, seed=1)
    exact = tfl.KfacInfluence(model, LOSS, REG, fisher="exact", dtype=torch.float64).fit(loader(x, y, 200))
    sampled = tfl.KfacInfluence(model, LOSS, REG, fisher_samples=100, dtype=torch.float64).fit(loader(x, y, 200))

    def gradient_covariance(f):
        # eigenvalues = outer(l_S, l_A) and A does not depend on the targets, so the
        # last column (largest l_A) rebuilds S times the same constant in both fits.
        return (f.gradient_eigenvectors * f.eigenvalues[:, -1]) @ f.gradient_eigenvectors.T

    for name in exact.factors:
        got, expected = gradient_covariance(sampled.factors[name]), gradient_covariance(exact.factors[name])
        # 20,000 draws: a covariance's Monte Carlo error is ~ 1/sqrt(20000) ~ 1%, times a small constant.
        assert rel_error(got, expected) < 0.05, name


@pytest.mark.parametrize("chunk_elements", [1 << 22, 1])  # one chunk / one sample per chunk
@pytest.mark.parametrize("T, d_in, d_out", [(64, 5, 3), (2, 40, 30)])  # forms first / rotates first
def test_ekfac_rotated_squares_equal_either_order(T, d_in, d_out, chunk_elements, monkeypatch):
    from torchfluence import budget
    from torchfluence.capture import Captured
    from torchfluence.solvers.kfac import _rotated_squares

    monkeypatch.setattr(budget, "TEMPORARY_ELEMENTS", chunk_elements)

    g = torch.randn(2, 7, T, d_out, dtype=torch.float64)
    a = torch.randn(7, T, d_in, dtype=torch.float64)
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))[0]
    expected = sum((q_s.T @ g[k, j].T @ a[j] @ q_a).square() for j in range(7) for k in range(2))
    cap = Captured([a], [g], torch.zeros(7, 1, dtype=torch.float64))
    assert torch.allclose(_rotated_squares(cap, 0, g, q_s, q_a), expected, rtol=1e-12, atol=1e-12)


def test_ekfac_on_conv1d_equals_the_same_net_as_conv2d():
    # Conv1d(c, o, k) is Conv2d(c, o, (1, k)) on inputs with a height of 1: EK-FAC must see the same patches.
    torch.manual_seed(0)
    net1 = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3, stride=2, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 6, 4)).double()
    net2 = torch.nn.Sequential(torch.nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 1)), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(3 * 6, 4)).double()
    with torch.no_grad():
        net2[0].weight.copy_(net1[0].weight.unsqueeze(2))
        net2[0].bias.copy_(net1[0].bias)
        net2[3].load_state_dict(net1[3].state_dict())
    x, y = torch.randn(40, 2, 12, dtype=torch.float64), torch.randint(0, 4, (40,))
    runs = [tfl.EkfacInfluence(net, F.cross_entropy, 0.1, fisher="exact").fit((inputs, y))
            .influences(inputs[:5], y[:5], inputs, y) for net, inputs in ((net1, x), (net2, x.unsqueeze(2)))]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-10, atol=1e-12)


def test_kfac_solve_in_row_chunks_equals_one_chunk(monkeypatch):
    """Chunking the rows of a K-FAC solve only splits independent rows: same float64 values."""
    from torchfluence import budget

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    im = tfl.EkfacInfluence(model, F.cross_entropy, 0.1, dtype=torch.float64).fit((x, y))
    v = torch.randn(7, im.num_params, dtype=torch.float64)
    whole = im.solve(v)
    monkeypatch.setattr(budget, "TEMPORARY_ELEMENTS", 1)  # one row per chunk
    torch.testing.assert_close(im.solve(v), whole, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 1])  # one chunk / one sample per chunk
@pytest.mark.parametrize("solver", [tfl.KfacInfluence, tfl.EkfacInfluence])
def test_query_factors_from_captures_equal_the_dense_solve(solver, chunk_elements, monkeypatch):
    """Test factors rotated from each query's capture (positions rotated first where that is
    cheaper) equal (F + lambda I)^-1 applied to the dense per-sample gradients."""
    from torchfluence import budget

    monkeypatch.setattr(budget, "TEMPORARY_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    # A conv at 8 x 8 positions forms each gradient first (T = 64 >> d_in = 10); the conv
    # at 2 x 2 and the Linear (T = 1) rotate their positions first.
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(4), nn.Conv2d(3, 16, 1),
                          nn.Tanh(), nn.Flatten(), nn.Linear(64, 4)).double()
    x, y = torch.randn(30, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (30,))
    xt, yt = torch.randn(9, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (9,))
    im = solver(model, F.cross_entropy, 0.1, dtype=torch.float64, block_size=4).fit((x, y))
    assert im._queries_from_captures()
    got = im._prepared_factors(xt, yt).parts
    monkeypatch.setattr(im, "_queries_from_captures", lambda: False)  # dense gradients, then solve
    expected = im._prepared_factors(xt, yt).parts
    monkeypatch.undo()
    monkeypatch.setattr(budget, "TEMPORARY_ELEMENTS", chunk_elements)
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        # float64 products of orthogonal rotations in another order: rounding only.
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    scores = im.train_influences(xt, yt)
    torch.testing.assert_close(scores, im.influences_from_factors(im.influence_factors(xt, yt), x, y),
                               rtol=1e-10, atol=1e-12)


def test_query_factors_name_a_non_finite_query(monkeypatch):
    from torchfluence.solvers import kfac

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    im = tfl.EkfacInfluence(model, F.cross_entropy, 0.1, dtype=torch.float64, block_size=4).fit((x, y))
    xt, yt = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    rotate = kfac._rotated_gradients

    def poisoned(cap, i, start, stop, *args, **kwargs):  # the query of global index 5: row 1 of the second block
        out = rotate(cap, i, start, stop, *args, **kwargs)
        if cap.outputs.shape[0] == 2:
            out[1, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(kfac, "_rotated_gradients", poisoned)
    with pytest.raises(ValueError, match=r"per-sample gradients.*sample 5"):
        im.train_influences(xt, yt)
