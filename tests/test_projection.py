"""Random projections: the SJLT kernels against their float64 twin, bit-level determinism,
the Johnson-Lindenstrauss property, the Kronecker (LoGra) route against the formed gradients,
and refusals of bad input."""

import hashlib
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchfluence import reference as R
from torchfluence._functional import ModelFunctions
from torchfluence.ops import sjlt_accumulate
from torchfluence.capture import capture, find_layers
from torchfluence.projectors import DenseProjector, KroneckerProjector, Projector, SparseJLProjector

from .conftest import CUDA_READY, DEVICES

ROOT = Path(__file__).resolve().parents[1]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
needs_cuda = pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a build with CUDA kernels")


def assert_within_summation_bound(got, G, k, s, seed, offset, out0):
    """The kernel's result is within the worst-case rounding bound of its own summation.

    Output (r, b) is a sequential sum of out0[r, b] and m_b terms +-fl(scale * G[r, c]):
    each term is rounded once (relative u) and each of the m_b additions once, so
    |error| <= (m_b + 2) u (|out0| + sum |terms|) (Higham, Accuracy and Stability, 4.2),
    plus u |scale| for the rounding of scale itself, covered by one more u.
    """
    u = UNIT_ROUNDOFF[got.dtype]
    M = R.sjlt_matrix_reference(G.shape[1], k, s, seed, offset)
    expected = out0.double().cpu() + R.sjlt_reference(G, k, s, seed, offset)
    magnitude = out0.double().abs().cpu() + G.double().abs().cpu() @ M.abs().T
    terms = (M != 0).sum(dim=1).double()  # m_b, per bucket
    bound = (terms + 3) * u * magnitude
    err = (got.double().cpu() - expected).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


SHAPES = [  # (n, p, k, s, offset)
    (5, 37, 16, 3, 0),  # odd sizes
    (33, 1000, 100, 4, 7),  # several row panels, a partial one, blocks of uneven size
    (1, 1, 1, 1, 0),
    (17, 300, 64, 64, 2**40 + 3),  # s = k (blocks of one row); a large column offset
    (40, 9000, 1000, 2, 123),  # more columns than one hashed tile
    (3, 20, 7000, 5, 0),  # k much larger than p
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sjlt_kernel_matches_reference(device, shape, dtype):
    n, p, k, s, offset = shape
    G = torch.randn(n, p, dtype=dtype, device=device)
    out0 = torch.randn(n, k, dtype=dtype, device=device)
    out = out0.clone()
    sjlt_accumulate(G, out, s, 11, offset)
    assert_within_summation_bound(out, G, k, s, 11, offset, out0)


@pytest.mark.parametrize("device", DEVICES)
def test_sjlt_empty_inputs_leave_out_unchanged(device):
    for n, p in ((0, 10), (4, 0), (0, 0)):
        out = torch.randn(n, 8, device=device)
        before = out.clone()
        sjlt_accumulate(torch.randn(n, p, device=device), out, 2, 0)
        assert torch.equal(out, before)
    P = SparseJLProjector(6, 8)
    assert P.project(torch.randn(0, 6, device=device)).shape == (0, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sjlt_strides_do_not_change_bits(device, dtype):
    G = torch.randn(23, 611, dtype=dtype, device=device)
    expected = torch.zeros(23, 50, dtype=dtype, device=device)
    sjlt_accumulate(G, expected, 3, 5)
    # A transposed copy read through its strides, a column-strided view, and a transposed output.
    for view in (G.T.contiguous().T, torch.stack([G, G], dim=2)[:, :, 1]):
        out = torch.zeros(50, 23, dtype=dtype, device=device).T
        sjlt_accumulate(view, out, 3, 5)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_sjlt_column_blocks_give_the_same_bits_as_one_call(device):
    # Each output sums its terms in column order from its value in `out`, so the
    # blocks of a gradient (per-layer parts) need no concatenation and change nothing.
    G = torch.randn(37, 20000, device=device)
    P = SparseJLProjector(20000, 300, s=4, seed=9)
    whole = P.project(G)
    cuts = [0, 1, 4096, 4097, 13001, 20000]
    parts = [G[:, a:b] for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(P.project_parts(parts), whole)


@pytest.mark.parametrize("device", DEVICES)
def test_sjlt_is_deterministic(device):
    G = torch.randn(70, 5000, device=device)
    P = SparseJLProjector(5000, 256, s=8, seed=3)
    assert torch.equal(P.project(G), P.project(G))


def test_sjlt_bits_do_not_depend_on_the_number_of_threads():
    script = textwrap.dedent("""
        import hashlib, torch
        from torchfluence.ops import sjlt_accumulate
        G = torch.randn(70, 30000, generator=torch.Generator().manual_seed(0))
        out = torch.zeros(70, 512)
        sjlt_accumulate(G, out, 4, 21)
        print(hashlib.sha256(out.numpy().tobytes()).hexdigest())
    """)
    G = torch.randn(70, 30000, generator=torch.Generator().manual_seed(0))
    out = torch.zeros(70, 512)
    sjlt_accumulate(G, out, 4, 21)
    here = hashlib.sha256(out.numpy().tobytes()).hexdigest()
    for threads in ("1",):  # serial against the default team
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == here, threads


def test_sjlt_matrix_is_the_hashed_one_with_unit_columns():
    P = SparseJLProjector(3000, 97, s=5, seed=2**62 + 1, dtype=torch.float64)
    M = P.matrix()
    assert torch.equal(M, R.sjlt_matrix_reference(3000, 97, 5, 2**62 + 1))
    # Exactly s non-zeros per column, one per block: every column has norm 1.
    assert bool(((M != 0).sum(dim=0) == 5).all())
    torch.testing.assert_close((M * M).sum(dim=0), torch.ones(3000, dtype=torch.float64), rtol=0, atol=1e-15)


def test_sjlt_hash_at_the_int64_edge():
    # Global column indices near 2**63: the hash's 64-bit arithmetic must wrap exactly like the
    # Python integers of the twin. Projecting the identity reads the buckets and signs off `out`.
    for offset in (2**31 - 3, 2**32 - 1, 2**62 + 5, 2**63 - 1 - 40):
        out = torch.zeros(40, 1000, dtype=torch.float64)
        sjlt_accumulate(torch.eye(40, dtype=torch.float64), out, 3, 77, offset)
        buckets, signs = R.sjlt_codes_reference(77, range(offset, offset + 40), 1000, 3)
        for c in range(40):
            nz = out[c].nonzero().flatten()
            order = buckets[c].argsort()
            assert torch.equal(nz, buckets[c][order]), offset
            assert torch.equal(out[c][nz].sign(), signs[c][order]), offset
    with pytest.raises(ValueError, match="offset"):
        sjlt_accumulate(torch.eye(40, dtype=torch.float64), torch.zeros(40, 8, dtype=torch.float64), 3, 0,
                        2**63 - 20)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sjlt_cpu_and_cuda_give_the_same_bits(dtype):
    for n, p, k, s in ((5, 37, 16, 3), (70, 20000, 300, 4), (1, 1000, 8192, 2), (1000, 3000, 64, 64)):
        G = torch.randn(n, p, dtype=dtype)
        out0 = torch.randn(n, k, dtype=dtype)
        cpu, gpu = out0.clone(), out0.cuda()
        sjlt_accumulate(G, cpu, s, 4, 2**35)
        sjlt_accumulate(G.cuda(), gpu, s, 4, 2**35)
        assert torch.equal(gpu.cpu(), cpu), (n, p, k, s)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sjlt_half_inputs_on_cuda_match_the_cpu_on_their_float32_values(dtype):
    # The kernel widens each element to float32 before scaling: the same terms as the
    # CPU kernel on the widened input, in the same order.
    G = torch.randn(45, 5000).to(dtype)
    cpu = torch.zeros(45, 700)
    sjlt_accumulate(G.float(), cpu, 4, 8)
    gpu = torch.zeros(45, 700, device="cuda")
    sjlt_accumulate(G.cuda(), gpu, 4, 8)
    assert torch.equal(gpu.cpu(), cpu)
    P = SparseJLProjector(5000, 700, s=4, seed=8)
    assert torch.equal(P.project(G.cuda()).cpu(), cpu)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.cuda
def test_sjlt_cuda_addresses_more_than_2_to_the_31_elements():
    # 33 rows of 2**26 + 1 float16 columns: row 32 starts past element 2**31, so a 32-bit
    # offset anywhere would read the wrong memory. Rows are independent: the last row
    # projected alone (and on the CPU) must give the same bits.
    n, p = 33, 2**26 + 1
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * p * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    G = torch.empty(n, p, dtype=torch.float16, device="cuda")
    G[:-1].fill_(0.5)
    G[-1].normal_(generator=torch.Generator(device="cuda").manual_seed(0))
    out = torch.zeros(n, 256, device="cuda")
    sjlt_accumulate(G, out, 4, 1)
    alone = torch.zeros(1, 256, device="cuda")
    sjlt_accumulate(G[-1:].clone(), alone, 4, 1)
    assert torch.equal(out[-1:], alone)
    cpu = torch.zeros(1, 256)
    sjlt_accumulate(G[-1:].float().cpu(), cpu, 4, 1)
    assert torch.equal(alone.cpu(), cpu)


# ---------------------------------------------------------------------------
# The Johnson-Lindenstrauss property.


def jl_eps(k: int, events: int, delta: float = 1e-3) -> float:
    """Smallest eps with events * P(|‖Px‖² - ‖x‖²| > eps ‖x‖²) <= delta under the Gaussian tail bound.

    Dasgupta & Gupta (2003): P(‖Px‖² >= (1 + eps)‖x‖²) <= exp(-k (eps²/2 - eps³/3) / 2), and
    the lower tail is smaller, so 2 exp(...) bounds both; a union bound covers all events.
    The same form holds for Rademacher entries (Achlioptas 2003) and for the SJLT
    (Kane & Nelson 2014; with small s, for vectors whose mass is spread, as here).
    """
    lo, hi = 0.0, 1.0
    for _ in range(100):
        eps = (lo + hi) / 2
        if events * 2 * math.exp(-k * (eps**2 / 2 - eps**3 / 3) / 2) <= delta:
            hi = eps
        else:
            lo = eps
    return hi


JL_PROJECTORS = {
    "gaussian": lambda p, k: DenseProjector(p, k, seed=1, dtype=torch.float64),
    "rademacher": lambda p, k: DenseProjector(p, k, seed=2, distribution="rademacher", dtype=torch.float64),
    "sjlt-s4": lambda p, k: SparseJLProjector(p, k, s=4, seed=3, dtype=torch.float64),
    "sjlt-s1": lambda p, k: SparseJLProjector(p, k, s=1, seed=4, dtype=torch.float64),
}


@pytest.mark.parametrize("kind", list(JL_PROJECTORS))
def test_projections_preserve_norms_and_inner_products_within_the_jl_bound(kind):
    m, p, k = 30, 4000, 2048
    x = torch.randn(m, p, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x /= x.norm(dim=1, keepdim=True)
    y = JL_PROJECTORS[kind](p, k).project(x)
    # m norms, and the m(m - 1) vectors x_i +- x_j whose norms give the inner products by
    # polarization: |<Px, Py> - <x, y>| <= eps (‖x‖² + ‖y‖²) / 2 = eps for unit vectors.
    eps = jl_eps(k, m * m)
    norm_err = (y.norm(dim=1) ** 2 - 1).abs().max()
    gram_err = (y @ y.T - x @ x.T).abs().max()
    assert norm_err <= eps and gram_err <= eps, (float(norm_err), float(gram_err), eps)


def test_kronecker_preserves_rank_one_gradients_within_the_jl_bound():
    # A T = 1 layer's per-sample gradient is d a^T, projected to (P_out d)(P_in a)^T, so
    # <PG, PH> = <P_out d, P_out d'> <P_in a, P_in a'>: with each factor within eps_o and
    # eps_i of the truth (unit vectors), the product is within (1 + eps_o)(1 + eps_i) - 1.
    m, d_out, d_in, k_out, k_in = 25, 300, 400, 1024, 1024
    gen = torch.Generator().manual_seed(6)
    d = torch.randn(m, 1, d_out, dtype=torch.float64, generator=gen)
    a = torch.randn(m, 1, d_in, dtype=torch.float64, generator=gen)
    d, a = d / d.norm(dim=2, keepdim=True), a / a.norm(dim=2, keepdim=True)
    K = KroneckerProjector(d_out, d_in, k_out, k_in, seed=7)
    y = K.project_captured(a, d)
    g = torch.einsum("nto,nti->noi", d, a).flatten(1)
    eps = (1 + jl_eps(k_out, m * m)) * (1 + jl_eps(k_in, m * m)) - 1
    err = (y @ y.T - g @ g.T).abs().max()
    assert err <= eps, (float(err), eps)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt", "kronecker"])
def test_projections_are_unbiased(kind):
    # E[<Pg, Ph>] = <g, h>: the mean over 400 seeds is within 4 standard errors (fixed seeds).
    p = 48
    gen = torch.Generator().manual_seed(8)
    g, h = torch.randn(2, p, dtype=torch.float64, generator=gen)
    make = {
        "gaussian": lambda seed: DenseProjector(p, 16, seed=seed),
        "rademacher": lambda seed: DenseProjector(p, 16, seed=seed, distribution="rademacher"),
        "sjlt": lambda seed: SparseJLProjector(p, 16, s=2, seed=seed),
        "kronecker": lambda seed: KroneckerProjector(6, 8, 4, 4, seed=seed),
    }[kind]
    values = []
    for seed in range(400):
        y = make(seed).project(torch.stack([g, h]))
        values.append(y[0] @ y[1])
    values = torch.stack(values)
    stderr = values.std() / 400**0.5
    assert abs(values.mean() - g @ h) <= 4 * stderr, (float(values.mean()), float(g @ h), float(stderr))


# ---------------------------------------------------------------------------
# Dense and Kronecker projectors against their twins.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_projector_matches_reference(device, distribution, dtype):
    p, k = 2500, 40  # p spans three generator chunks
    P = DenseProjector(p, k, seed=13, distribution=distribution)
    M = R.dense_matrix_reference(p, k, 13, distribution)
    assert torch.equal(P.matrix(), M)
    G = torch.randn(9, p, dtype=dtype, device=device)
    got = P.project(G)
    assert got.dtype == dtype and got.device == G.device
    expected = G.double().cpu() @ M.T
    # A dot product of p terms: rounding grows at most like p u sum|terms|, in practice like sqrt(p).
    bound = 8 * UNIT_ROUNDOFF[dtype] * p**0.5 * (G.double().abs().cpu() @ M.abs().T)
    assert bool(((got.double().cpu() - expected).abs() <= bound).all())
    parts = P.project_parts([G[:, :999], G[:, 999:1000], G[:, 1000:]])
    assert bool(((parts.double().cpu() - expected).abs() <= bound).all())


KRON_SHAPES = [  # (n, T, d_out, d_in, k_out, k_in)
    (6, 1, 7, 5, 3, 4),  # a Linear layer
    (4, 9, 11, 13, 5, 2),  # conv-like: several positions
    (1, 1, 1, 1, 1, 1),
    (3, 2, 20, 31, 20, 31),  # k = d: a square (invertible) projection
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", KRON_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kronecker_captured_equals_projected_gradient(device, shape, dtype):
    n, T, d_out, d_in, k_out, k_in = shape
    A = torch.randn(n, T, d_in, dtype=dtype, device=device)
    D = torch.randn(n, T, d_out, dtype=dtype, device=device)
    K = KroneckerProjector(d_out, d_in, k_out, k_in, seed=17)
    captured = K.project_captured(A, D)
    formed = K.project(torch.einsum("nto,nti->noi", D, A).flatten(1))
    cut = d_in + 1 if d_out * d_in > d_in + 1 else 0  # a piece ending inside a gradient row
    parts = K.project_parts([torch.einsum("nto,nti->noi", D, A).flatten(1)[:, :cut],
                             torch.einsum("nto,nti->noi", D, A).flatten(1)[:, cut:]])
    expected = R.kronecker_reference(A, D, k_out, k_in, 17)
    p_out, p_in = R.kronecker_factors_reference(d_out, d_in, k_out, k_in, 17)
    # Bound from the magnitudes summed: every route chains at most T + d_out + d_in roundings per term.
    magnitude = torch.einsum("nto,nti->noi", D.double().abs().cpu(), A.double().abs().cpu()).flatten(1) @ \
        torch.kron(p_out.abs(), p_in.abs()).T
    bound = 8 * UNIT_ROUNDOFF[dtype] * (T + d_out + d_in) * magnitude + 1e-300
    for got in (captured, formed, parts):
        assert got.shape == (n, k_out * k_in) and got.dtype == dtype and got.device == A.device
        assert bool(((got.double().cpu() - expected).abs() <= bound).all())


def test_kronecker_projector_for_captured_layers():
    # Through the real capture: a Linear with bias (d_in + 1 input columns) and a Conv2d (patches).
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    x, y = torch.randn(7, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (7,))
    functions = ModelFunctions(model.eval(), F.cross_entropy, None, torch.float64)
    layers, missing = find_layers(functions)
    assert missing == []
    cap = capture(functions, layers, x, y)
    flat = functions.per_sample_grads(x, y)
    for i, (layer, a, d) in enumerate(zip(layers, cap.activations, cap.output_grads)):
        K = KroneckerProjector.for_layer(layer, 4, 6, seed=i)
        from_capture = K.project_captured(a, d)
        from_gradient = K.project(layer.matrices(flat).flatten(1))
        torch.testing.assert_close(from_capture, from_gradient, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.cuda
def test_dense_and_kronecker_apply_the_same_matrix_on_cuda():
    G = torch.randn(5, 300, dtype=torch.float64)
    for P in (DenseProjector(300, 20, seed=1), KroneckerProjector(15, 20, 4, 5, seed=1),
              SparseJLProjector(300, 20, seed=1)):
        torch.testing.assert_close(P.project(G.cuda()).cpu(), P.project(G), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Refusals.


def test_projectors_refuse_bad_construction():
    cases = [
        (lambda: SparseJLProjector(0, 8), ValueError, "p must be >= 1, got 0"),
        (lambda: SparseJLProjector(10, 0), ValueError, "k must be >= 1, got 0"),
        (lambda: SparseJLProjector(10, -3), ValueError, "k must be >= 1, got -3"),
        (lambda: SparseJLProjector(10, 8, s=9), ValueError, r"s must be in \[1, min\(k, 64\)\], got s = 9"),
        (lambda: SparseJLProjector(10, 200, s=65), ValueError, "s must be in"),
        (lambda: SparseJLProjector(10, 8, seed=-1), ValueError,
         r"seed must be in \[0, 2\*\*63 - 1\], got -1"),
        (lambda: SparseJLProjector(10, 8, seed=1.5), TypeError, "seed must be an int, got float"),
        (lambda: SparseJLProjector(10.0, 8), TypeError, "p must be an int, got float"),
        (lambda: DenseProjector(10, 8, dtype=torch.float16), TypeError, "dtype must be None"),
        (lambda: DenseProjector(10, 8, distribution="cauchy"), ValueError, "distribution must be"),
        (lambda: KroneckerProjector(3, 0, 2, 2), ValueError, "d_in must be >= 1, got 0"),
        (lambda: KroneckerProjector(3, 4, 2, 0), ValueError, "k_in must be >= 1, got 0"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message):
            make()


@pytest.mark.parametrize("make", [
    lambda: SparseJLProjector(10, 8),
    lambda: DenseProjector(10, 8),
    lambda: KroneckerProjector(2, 5, 2, 4),
])
def test_projectors_refuse_bad_inputs(make):
    P: Projector = make()
    name = type(P).__name__
    cases = [
        (lambda: P.project(torch.randn(10)), ValueError,
         rf"{name}.project: g must be 2-D \(n, p\), got shape \(10,\)"),
        (lambda: P.project(torch.randn(3, 11)), ValueError,
         r"g must have p = 10 columns, got shape \(3, 11\)"),
        (lambda: P.project(torch.ones(3, 10, dtype=torch.int64)), TypeError, "g must have a floating dtype"),
        (lambda: P.project([[1.0] * 10]), TypeError, "g must be a torch.Tensor, got list"),
        (lambda: P.project_parts([torch.randn(3, 4), torch.randn(3, 5)]), ValueError,
         r"the parts must have p = 10 columns in all, got 9"),
        (lambda: P.project_parts([torch.randn(3, 4), torch.randn(2, 6)]), ValueError,
         r"parts\[1\] must have n = 3 rows"),
        (lambda: P.project_parts([torch.randn(3, 4), torch.randn(3, 6, dtype=torch.float64)]), ValueError,
         r"parts\[1\] must be torch.float32"),
        (lambda: P.project_parts([]), ValueError, "at least one"),
        (lambda: P.accumulate(torch.randn(3, 4), torch.zeros(3, 8), 7), ValueError,
         r"need 0 <= offset <= 6 for 4 columns, got offset 7"),
        (lambda: P.accumulate(torch.randn(3, 4), torch.zeros(3, 7), 0), ValueError,
         r"out must have shape \(n, k\) = \(3, 8\), got \(3, 7\)"),
        (lambda: P.accumulate(torch.randn(3, 4), torch.zeros(3, 8, dtype=torch.float16), 0), TypeError,
         "out must be float32 or float64"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_kronecker_refuses_bad_captures():
    K = KroneckerProjector(3, 5, 2, 2)
    A, D = torch.randn(4, 2, 5), torch.randn(4, 2, 3)
    cases = [
        (lambda: K.project_captured(A[:, 0], D), ValueError,
         r"A must have shape \(n, T, d_in\) = \(n, T, 5\)"),
        (lambda: K.project_captured(A, torch.randn(4, 2, 4)), ValueError,
         r"D must have shape \(n, T, d_out\)"),
        (lambda: K.project_captured(A, D[:3]), ValueError, "must agree in n and T"),
        (lambda: K.project_captured(A, D[:, :1]), ValueError, "must agree in n and T"),
        (lambda: K.project_captured(A.long(), D), TypeError, "A must have a floating dtype"),
        (lambda: K.project_captured(A, "D"), TypeError, "D must be a torch.Tensor, got str"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_sjlt_op_refuses_bad_arguments_without_writing():
    G, out = torch.randn(4, 30), torch.zeros(4, 16)
    cases = [
        (lambda: sjlt_accumulate(G.long(), out, 2, 0), TypeError, "G must have dtype in"),
        (lambda: sjlt_accumulate(G.half(), out, 2, 0), TypeError, r"G must have dtype in \['torch.float32'"),
        (lambda: sjlt_accumulate(G[0], out, 2, 0), ValueError,
         r"G must be 2-D \(n, p_block\), got shape \(30,\)"),
        (lambda: sjlt_accumulate(G, out.double(), 2, 0), TypeError, r"out must be a \(4, 16\) torch.float32"),
        (lambda: sjlt_accumulate(G, torch.zeros(5, 16), 2, 0), ValueError, r"got \(5, 16\)"),
        (lambda: sjlt_accumulate(G, torch.zeros(4, 0), 1, 0), ValueError, "out must have 1 <= k"),
        (lambda: sjlt_accumulate(G, torch.zeros(16).expand(4, 16), 2, 0), ValueError, "overlapping"),
        (lambda: sjlt_accumulate(G, out, 0, 0), ValueError,
         r"s must be in \[1, min\(k, 64\)\] = \[1, 16\], got 0"),
        (lambda: sjlt_accumulate(G, out, 17, 0), ValueError, "got 17"),
        (lambda: sjlt_accumulate(G, out, 2, -5), ValueError, "seed must be in"),
        (lambda: sjlt_accumulate(G, out, 2, 2**64), ValueError, "seed must fit in int64"),
        (lambda: sjlt_accumulate(G, out, 2, 0, -1), ValueError, "offset must be >= 0, got -1"),
        (lambda: sjlt_accumulate(G, out, 2.0, 0), TypeError, "s must be an int, got float"),
        (lambda: sjlt_accumulate(G.numpy(), out, 2, 0), TypeError, "G must be a torch.Tensor, got ndarray"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert not out.any()


@pytest.mark.parametrize("device", DEVICES)
def test_sjlt_op_passes_opcheck(device):
    G = torch.randn(5, 40, dtype=torch.float64, device=device)
    out = torch.zeros(5, 12, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.torchfluence.sjlt_accumulate.default, (G, 2**34, 3, 7, out))


def test_sjlt_op_under_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def project_doubled(G, out):
        torch.ops.torchfluence.sjlt_accumulate(G * 2, 5, 3, 7, out)
        return out.sum()

    G = torch.randn(6, 50)
    compiled, eager = torch.zeros(6, 20), torch.zeros(6, 20)
    project_doubled(G, compiled)
    sjlt_accumulate(G * 2, eager, 3, 7, 5)
    assert torch.equal(compiled, eager)
