"""Block-diagonal curvature (block_structure=) on the native solvers, and the empirical Fisher.

The oracle is a float64 dense solve: the curvature C over all parameters (the exact
Hessian, or the empirical Fisher (1/n) G^T G from per-sample gradients), with every
entry between two blocks set to zero and lambda_B added on block B's diagonal, then

    influences = G_test (C_bd + diag(lambda))^-1 G^T.

The blocks' columns are worked out here from the parameter sizes, apart from the
library's own column bookkeeping.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch import nn
from torchfluence.curvature import EmpiricalFisher, curvature_operator

from .digits import exact_hessian, loop_grads

LOSS = F.cross_entropy
N = 30
# Parameters in flat order: 0.weight (5x4), 0.bias (5), 2.weight (3x5), 2.bias (3); p = 43.
SIZES = {"0.weight": 20, "0.bias": 5, "2.weight": 15, "2.bias": 3}
LAYERS = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
PER_TENSOR = {name: [name] for name in SIZES}
# Not contiguous, and listed out of the flat order: gathered and scattered by column.
SPLIT = {"weights": ["2.weight", "0.weight"], "biases": ["0.bias", "2.bias"]}
# The Hessian of this untrained tanh network has eigenvalues down to about -0.12 (any
# block's, by interlacing, too); 0.3 and more keeps every block of H + lambda I positive definite.
LAMBDAS = {"0": 0.3, "2": 0.5}


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    grads = loop_grads(model, LOSS, x, y)  # (N, 43)
    curvatures = {"hessian": exact_hessian(model, LOSS, x, y), "empirical_fisher": grads.T @ grads / N}
    return model, x, y, grads, curvatures


def columns(params: list[str]) -> torch.Tensor:
    """The flat-vector columns of `params`, from the sizes above."""
    start, spans = 0, {}
    for name, size in SIZES.items():
        spans[name] = torch.arange(start, start + size)
        start += size
    return torch.cat([spans[p] for p in params])


def reference(problem, second_order: str, blocks: dict, lambdas: dict, n_test: int = 4) -> torch.Tensor:
    """G_test (C_bd + diag(lambda))^-1 G^T by a dense float64 solve, (n_test, N)."""
    _, _, _, grads, curvatures = problem
    full = curvatures[second_order]
    matrix = torch.zeros_like(full)
    for block, params in blocks.items():
        index = columns(params)
        matrix[index[:, None], index] = full[index[:, None], index]
        matrix[index, index] += lambdas[block]
    assert float(torch.linalg.eigvalsh(matrix)[0]) > 0.05  # well posed: solvers converge, the solve is exact
    return torch.linalg.solve(matrix, grads[:n_test].T).T @ grads.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# Tolerances, relative to the largest score. The blocks of C + lambda I have condition
# numbers below ~20 here. Direct: two float64 Cholesky solves of the same matrices, ~1e-14
# (measured: below 1e-15). CG at rtol 1e-12: the error is at most cond x rtol = 2e-11 per block.
# Arnoldi and Nystroem (rank 35, the largest block) keep every eigenpair of each block, so they
# are exact up to Lanczos' and the sketch's float64 rounding. LiSSA: on the full batch
# (block_size = N) the recursion contracts by 1 - (smallest eigenvalue + lambda) / scale <= 0.85
# per step, 0.85^400 ~ 1e-28 after 400 steps, so only rounding is left.
SOLVERS = {
    "direct": (lambda model, lam, **kw: tfl.DirectInfluence(model, LOSS, lam, **kw), 1e-12),
    "cg": (lambda model, lam, **kw: tfl.CgInfluence(model, LOSS, lam, rtol=1e-12, **kw), 1e-10),
    "cg-single": (lambda model, lam, **kw: tfl.CgInfluence(model, LOSS, lam, rtol=1e-12, block=False, **kw),
                  1e-10),
    "arnoldi": (lambda model, lam, **kw: tfl.ArnoldiInfluence(model, LOSS, lam, 35, **kw), 1e-10),
    "nystroem": (lambda model, lam, **kw: tfl.NystroemSketchInfluence(model, LOSS, lam, 35, **kw), 1e-10),
    "lissa": (lambda model, lam, **kw: tfl.LissaInfluence(model, LOSS, lam, maxiter=400, scale=2.0,
                                                          block_size=N, **kw), 1e-10),
}
STRUCTURES = {"layer": LAYERS, "parameter": PER_TENSOR, "split": SPLIT}
# The Nystroem sketch and LiSSA's series need a positive semi-definite curvature: the empirical Fisher only.
CURVATURES = [(name, so) for name in SOLVERS for so in ("hessian", "empirical_fisher")
              if not (name in ("nystroem", "lissa") and so == "hessian")]


def lambdas_for(blocks: dict) -> dict:
    """A different lambda per block, each at least 0.3."""
    return {block: 0.3 + 0.1 * i for i, block in enumerate(blocks)}


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("name, second_order", CURVATURES, ids=[f"{n}-{so}" for n, so in CURVATURES])
def test_block_diagonal_solvers_match_the_dense_block_diagonal_solve(problem, name, second_order, structure):
    model, x, y, _, _ = problem
    make, tolerance = SOLVERS[name]
    blocks = STRUCTURES[structure]
    lambdas = lambdas_for(blocks)
    given = SPLIT if structure == "split" else structure
    im = make(model, lambdas, block_structure=given, second_order=second_order).fit((x, y))
    assert im.block_names == list(blocks)
    # Each block's parameters in the flat order, whatever order the mapping gave.
    assert im.blocks == {b: sorted(ps, key=list(SIZES).index) for b, ps in blocks.items()}
    assert im.regularization == im.block_regularization == lambdas
    expected = reference(problem, second_order, blocks, lambdas)
    assert rel(im.influences(x[:4], y[:4], x, y), expected) < tolerance
    # Factors stay flat in the parameter order, as without blocks.
    factors = im.influence_factors(x[:4], y[:4])
    assert factors.shape == (4, sum(SIZES.values()))
    assert torch.equal(im.influences_from_factors(factors, x, y), im.influences(x[:4], y[:4], x, y))


def test_per_block_regularization_reaches_each_block(problem):
    model, x, y, _, _ = problem
    one = tfl.DirectInfluence(model, LOSS, 0.4, block_structure="layer").fit((x, y))
    assert one.regularization == {"0": 0.4, "2": 0.4}  # one number: every block
    expected = reference(problem, "hessian", LAYERS, {"0": 0.4, "2": 0.4})
    assert rel(one.influences(x[:4], y[:4], x, y), expected) < 1e-10
    swapped = {"0": LAMBDAS["2"], "2": LAMBDAS["0"]}

    def scores(lambdas):
        im = tfl.DirectInfluence(model, LOSS, lambdas, block_structure="layer").fit((x, y))
        return im.influences(x[:4], y[:4], x, y)

    a, b = scores(LAMBDAS), scores(swapped)
    assert rel(a, reference(problem, "hessian", LAYERS, LAMBDAS)) < 1e-10
    assert rel(b, reference(problem, "hessian", LAYERS, swapped)) < 1e-10
    assert rel(a, b) > 1e-2  # each lambda reached its own block


@pytest.mark.parametrize("name", ["direct", "cg", "lissa"])
def test_with_regularization_per_block_equals_a_fresh_fit(problem, name):
    """No state depends on lambda (Direct refactors each block's H), so the bits equal a fit with it."""
    model, x, y, _, _ = problem
    make, _ = SOLVERS[name]
    so = "empirical_fisher"
    changed = make(model, 1.0, block_structure="layer", second_order=so).fit((x, y))
    assert changed.with_regularization(LAMBDAS) is changed
    assert changed.regularization == LAMBDAS
    assert {b: s.regularization for b, s in changed.block_solvers.items()} == LAMBDAS
    fresh = make(model, LAMBDAS, block_structure="layer", second_order=so).fit((x, y))
    assert torch.equal(changed.influences(x[:4], y[:4], x, y), fresh.influences(x[:4], y[:4], x, y))
    with pytest.raises(ValueError, match=r"unknown block names \['1'\]"):
        changed.with_regularization({"0": 0.5, "1": 0.5})


def test_one_full_block_is_the_unblocked_solve(problem):
    """block_structure="full": one block whose solver does exactly what the unblocked solver does."""
    model, x, y, _, _ = problem
    blocked = tfl.DirectInfluence(model, LOSS, 0.4, block_structure="full").fit((x, y))
    plain = tfl.DirectInfluence(model, LOSS, 0.4).fit((x, y))
    assert blocked.block_names == ["full"] and plain.blocks is None and plain.block_names == []
    assert torch.equal(blocked.influences(x[:4], y[:4], x, y), plain.influences(x[:4], y[:4], x, y))
    assert torch.equal(blocked.curvature, plain.curvature)


def test_direct_curvature_is_the_block_diagonal_matrix(problem):
    model, x, y, _, curvatures = problem
    im = tfl.DirectInfluence(model, LOSS, 0.4, block_structure=SPLIT).fit((x, y))
    expected = torch.zeros_like(curvatures["hessian"])
    for params in SPLIT.values():
        index = columns(params)
        expected[index[:, None], index] = curvatures["hessian"][index[:, None], index]
    # H from batched Hessian-vector products against torch.func.hessian: float64 rounding.
    assert rel(im.curvature, expected) < 1e-12
    assert bool((im.curvature[columns(SPLIT["weights"])[:, None], columns(SPLIT["biases"])] == 0).all())


# -- saved and loaded -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["direct", "cg", "lissa", "arnoldi", "nystroem"])
def test_save_load_round_trip_is_bitwise(problem, tmp_path, name):
    model, x, y, _, _ = problem
    make, _ = SOLVERS[name]
    im = make(model, LAMBDAS, block_structure="layer", second_order="empirical_fisher").fit((x, y))
    expected = im.influences(x[:4], y[:4], x, y)
    path = im.save(tmp_path / "s.safetensors")
    cls = type(im)
    train = (x, y) if cls.traits.solve_reads_train_data else None
    loaded = cls.load(path, model, LOSS, train_data=train)
    assert loaded.block_structure == "layer" and loaded.regularization == LAMBDAS
    # Each block's state goes back into that block's solver: the same solves, the same bits.
    assert torch.equal(loaded.influences(x[:4], y[:4], x, y), expected)
    assert loaded.settings() == im.settings()
    with pytest.raises(ValueError, match="block_structure.*fitted with"):
        cls.load(path, model, LOSS, train_data=train, block_structure="parameter")


def test_saved_state_is_per_block_and_a_load_may_change_lambda(problem, tmp_path):
    from torchfluence.persist import read

    model, x, y, _, _ = problem
    im = tfl.DirectInfluence(model, LOSS, LAMBDAS, block_structure="layer").fit((x, y))
    path = im.save(tmp_path / "s.safetensors")
    header, tensors = read(path)
    assert sorted(tensors) == [f"block/{b}/{key}" for b in ("0", "2") for key in ("cholesky", "curvature")]
    assert header["options"]["block_structure"] == "layer" and header["options"]["regularization"] == LAMBDAS
    other = {"0": 0.6, "2": 0.35}
    loaded = tfl.DirectInfluence.load(path, model, LOSS, regularization=other)
    fresh = tfl.DirectInfluence(model, LOSS, other, block_structure="layer").fit((x, y))
    # The saved blocks' H refactored with the new lambdas: the factorisations of a fresh fit.
    assert torch.equal(loaded.influences(x[:4], y[:4], x, y), fresh.influences(x[:4], y[:4], x, y))


def test_settings_name_the_blocks_and_their_lambdas(problem):
    model, _, _, _, _ = problem
    layer = tfl.CgInfluence(model, LOSS, LAMBDAS, block_structure="layer").settings()
    assert layer["block_structure"] == "layer" and layer["regularization"] == LAMBDAS
    split = tfl.CgInfluence(model, LOSS, 0.3, block_structure=SPLIT).settings()
    assert split["block_structure"] == SPLIT and split["regularization"] == {"weights": 0.3, "biases": 0.3}
    assert tfl.CgInfluence(model, LOSS, 0.3).settings()["block_structure"] is None


# -- head mode ------------------------------------------------------------------------------------
def test_blocks_in_head_mode_equal_the_generic_path():
    """Blocks of the trainable head (named inside it) give the scores of the same blocks on the full model."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(5)
    head = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), head).double().eval()
    model[0].requires_grad_(False)
    head = tfl.DirectInfluence(model, LOSS, 0.4, head="2", block_structure="layer").fit((x, y))
    assert head.features is not None and head.block_names == ["0", "2"]
    generic = tfl.DirectInfluence(model, LOSS, 0.4, head=False, block_structure={
        "0": ["2.0.weight", "2.0.bias"], "2": ["2.2.weight", "2.2.bias"]}).fit((x, y))
    # Two routes to the same float64 numbers (cached features against a full forward pass).
    assert rel(head.influences(x[:3], y[:3], x, y), generic.influences(x[:3], y[:3], x, y)) < 1e-10


# -- refused --------------------------------------------------------------------------------------
def _refusals(model):
    projector = tfl.DenseProjector(43, 8, seed=0, dtype=torch.float64)
    return [
        (lambda: tfl.KfacInfluence(model, LOSS, 0.1, block_structure="layer"), "block-diagonal per layer"),
        (lambda: tfl.EkfacInfluence(model, LOSS, 0.1, block_structure="layer"), "block-diagonal per layer"),
        (lambda: tfl.GradientSimilarity(model, LOSS, block_structure="layer"), "no curvature"),
        (lambda: tfl.DirectInfluence(model, LOSS, 0.1, block_structure="layer", projector=projector),
         "projection mixes the parameters"),
        (lambda: tfl.CgInfluence(model, LOSS, LAMBDAS), "needs block_structure="),
        (lambda: tfl.DirectInfluence(model, LOSS, {"0": 0.3, "1": 0.3}, block_structure="layer"),
         r"unknown block names \['1'\]"),
        (lambda: tfl.DirectInfluence(model, LOSS, {"0": 0.3}, block_structure="layer"), r"missing: \['2'\]"),
        (lambda: tfl.LissaInfluence(model, LOSS, {"0": 0.3, "2": -1.0}, block_structure="layer"),
         r"regularization\['2'\]"),
        (lambda: tfl.ArnoldiInfluence(model, LOSS, 0.3, 5, block_structure={"a": ["0.weight", "nope"]}),
         r"block_structure\['a'\]: unknown parameter names \['nope'\]"),
        (lambda: tfl.NystroemSketchInfluence(model, LOSS, 0.3, 5, block_structure={"a": ["0.weight"]}),
         r"missing: \['0.bias', '2.weight', '2.bias'\]"),
        (lambda: tfl.CgInfluence(model, LOSS, 0.3, block_structure={"a": ["0.weight"], "b": ["0.weight"]}),
         "disjoint"),
        (lambda: tfl.DirectInfluence(model, LOSS, 0.3, block_structure="diagonal"),
         r"block_structure must be one of \['full', 'layer', 'parameter'\]"),
        (lambda: tfl.NystroemSketchInfluence(model, LOSS, {"0": 0.0, "2": 0.3}, 5, block_structure="layer"),
         "regularization must be > 0"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_refusals_name_the_reason(problem, case):
    build, match = _refusals(problem[0])[case]
    with pytest.raises(ValueError, match=match):
        build()


def test_a_block_that_fails_to_fit_is_named(problem):
    model, x, y, _, _ = problem
    # The first layer's Hessian block has an eigenvalue of about -0.12: lambda 0 leaves it indefinite.
    with pytest.raises(ValueError, match="block '0': H \\+ regularization \\* I is not positive definite"):
        tfl.DirectInfluence(model, LOSS, {"0": 0.0, "2": 0.5}, block_structure="layer").fit((x, y))


# -- the empirical Fisher -------------------------------------------------------------------------
def test_empirical_fisher_is_the_mean_gradient_outer_product(problem):
    model, x, y, grads, curvatures = problem
    im = tfl.DirectInfluence(model, LOSS, 0.1, second_order="empirical_fisher").fit((x, y))
    assert isinstance(im.curvature_operator, EmpiricalFisher)
    # Per-sample gradients by torch.func against a plain autograd loop: float64 rounding.
    assert rel(im.curvature, curvatures["empirical_fisher"]) < 1e-12
    # One batch's product is (V G^T) G / b.
    v = torch.randn(3, 43, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    product = im.curvature_operator.batch_vp(v, x[:7], y[:7])
    assert rel(product, v @ grads[:7].T @ grads[:7] / 7) < 1e-12
    assert im.settings()["second_order"] == "empirical_fisher"


def test_empirical_fisher_is_not_replaced_by_the_linear_head_closed_form():
    """A plain nn.Linear with cross-entropy has a closed-form Hessian; the empirical Fisher still differs."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    im = tfl.DirectInfluence(model, LOSS, 0.1, second_order="empirical_fisher").fit((x, y))
    assert type(curvature_operator(im.functions, "empirical_fisher")) is EmpiricalFisher
    grads = loop_grads(model, LOSS, x, y)
    assert rel(im.curvature, grads.T @ grads / 20) < 1e-12
    with pytest.raises(ValueError, match="empirical_fisher"):
        tfl.DirectInfluence(model, LOSS, 0.1, second_order="fisher")
