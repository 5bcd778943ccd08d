"""influence_block against its float64 plain-PyTorch twin (reference.py)."""

import pytest
import torch
import torchfluence as tfl
from torchfluence.reference import influence_block_reference
from torchfluence.reference import select_topk

from .conftest import DEVICES, dtypes_for

SHAPES = [(1, 1, 1), (7, 13, 5), (37, 301, 129), (70, 1000, 67), (130, 517, 300)]  # (n_query, b, p)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_scores_match_float64_reference(device, shape):
    n_query, b, p = shape
    for dtype in dtypes_for(device):
        S = torch.randn(n_query, p, device=device).to(dtype)
        G = torch.randn(b, p, device=device).to(dtype)
        got = tfl.influence_scores(S, G)
        ref, _ = influence_block_reference(S, G)  # float64 on the (already rounded) inputs
        # Deterministic error bound of a length-p dot product accumulated in the
        # kernel's accumulation dtype: |err| <= gamma_p |S||G|^T, gamma_p ~ p*u.
        # Factor 2 covers the final rounding of the stored result.
        bound = 2 * p * _unit_roundoff(dtype) * (S.double().abs() @ G.double().abs().T) + 1e-300
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert ((got.double() - ref).abs() <= bound).all(), f"{dtype}: error above the dot-product bound"


def _integer_data(n_query, b, p, device, dtype):
    # Small integers: every dot product is exact in float16-input/float32-acc
    # arithmetic (|score| <= 9p << 2**24), and equal scores (ties) are common.
    S = torch.randint(-3, 4, (n_query, p), device=device).to(dtype)
    G = torch.randint(-3, 4, (b, p), device=device).to(dtype)
    return S, G


def _stream(S, G, k, block_sizes, offset=0):
    state = tfl.StreamingTopK(S.shape[0], k, device=S.device, dtype=S.dtype)
    start = 0
    for size in block_sizes:
        state.update(S, G[start:start + size], offset=offset + start)
        start += size
    assert start == G.shape[0]
    return state.result()


def _assert_same_topk(got, ref):
    for name in ("largest_indices", "smallest_indices"):
        assert torch.equal(getattr(got, name).cpu(), getattr(ref, name).cpu()), name
    for name in ("largest_values", "smallest_values"):
        assert torch.equal(getattr(got, name).double().cpu(), getattr(ref, name).double().cpu()), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "k,block_sizes",
    [
        (1, [50, 50, 50]),
        (5, [1, 0, 64, 85, 0]),  # empty blocks and a one-row block
        (10, [3, 4, 143]),  # k larger than the first blocks
        (32, [150]),
        (40, [7, 100, 43]),  # beyond the CUDA fused limit: the dense-merge path
        (200, [150]),  # k larger than everything seen: trimmed to 150
    ],
)
def test_streaming_topk_is_exact_with_ties(device, k, block_sizes):
    for dtype in dtypes_for(device):
        S, G = _integer_data(9, 150, 23, device, dtype)
        got = _stream(S, G, k, block_sizes)
        _, ref = influence_block_reference(S, G, k=k)
        _assert_same_topk(got, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_equals_full_matrix_topk_on_random_data(device):
    # Streaming must rank like the full matrix + a stable sort. On the CPU the block
    # products are the full product's columns bit for bit, so equality is exact; cuBLAS
    # picks a kernel per shape, and blocks of 1000, 13 and 1036 columns may sum the
    # 203 terms in another order than the full product: values agree to float32
    # rounding of such a sum (|terms| ~ 1, so ~203 * 6e-8 * |score|), indices exactly
    # (no two of these random scores are that close).
    S = torch.randn(67, 203, device=device)
    G = torch.randn(2049, 203, device=device)
    got = _stream(S, G, 7, [1000, 13, 1036])
    full = tfl.influence_scores(S, G)
    index = torch.arange(G.shape[0], device=device).expand_as(full)
    lv, li = select_topk(full, index, 7, largest=True)
    sv, si = select_topk(full, index, 7, largest=False)
    ref = tfl.TopKResult(lv, li, sv, si)
    if device == "cpu":
        _assert_same_topk(got, ref)
        return
    for name in ("largest_indices", "smallest_indices"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    for name in ("largest_values", "smallest_values"):
        assert torch.allclose(getattr(got, name), getattr(ref, name), rtol=2e-5, atol=0), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("columns", [1, 7, 64])
def test_column_chunks_give_the_same_topk_and_scores(device, columns, monkeypatch):
    # update() scores a block in column chunks sized to the GPU's L2; forcing tiny chunks
    # (on any device) must leave the top-k exact, ties included, and fill every column of
    # `out` (poisoned with NaN), at the chunk offsets.
    from torchfluence import topk as topk_module

    monkeypatch.setattr(topk_module, "score_chunk_columns", lambda n_query, device: columns)
    for dtype in dtypes_for(device):
        S, G = _integer_data(9, 150, 23, device, dtype)
        state = tfl.StreamingTopK(9, 10, device=device, dtype=S.dtype)
        out = torch.full((9, 100), float("nan"), device=device, dtype=state.largest_values.dtype)
        state.update(S, G[:100], out=out)
        state.update(S, G[100:])
        ref_scores, ref = influence_block_reference(S, G, k=10)
        _assert_same_topk(state.result(), ref)
        assert torch.equal(out.double().cpu(), ref_scores[:, :100].cpu())  # integers: exact in any order


def test_chunk_columns_fill_half_the_l2_in_whole_tiles():
    from torchfluence.budget import chunk_columns

    assert chunk_columns(2048, 50 * 2**20) == 3072  # 25 MiB of float32 scores: 3,200 columns, rounded down
    assert chunk_columns(10**6, 50 * 2**20) == 256  # never below one aligned chunk
    assert chunk_columns(2048, 0) is None  # unknown L2: one chunk per block
    assert chunk_columns(0, 2**20) % 256 == 0


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_of_scores_equals_the_streamed_top_k(device):
    S, G = _integer_data(9, 150, 23, device, torch.float32)
    scores = tfl.influence_scores(S, G)
    got = tfl.top_k_of_scores(scores, 12, offset=5)
    _, ref = influence_block_reference(S, G, k=12, offset=5)
    _assert_same_topk(got, ref)
    bad = scores.clone()
    bad[3, 77] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        tfl.top_k_of_scores(bad, 3)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, n\] = \[1, 150\], got 151"):
        tfl.top_k_of_scores(scores, 151)
    with pytest.raises(ValueError, match="2-D floating tensor"):
        tfl.top_k_of_scores(scores[0], 3)


@pytest.mark.parametrize("device", DEVICES)
def test_offsets_beyond_int32(device):
    offset = 2**31 + 12345
    S, G = _integer_data(4, 90, 11, device, torch.float32)
    got = _stream(S, G, 6, [40, 50], offset=offset)
    _, ref = influence_block_reference(S, G, offset=offset, k=6)
    _assert_same_topk(got, ref)
    assert int(got.largest_indices.min()) >= offset


@pytest.mark.parametrize("device", DEVICES)
def test_out_receives_block_and_topk_still_merges(device):
    S, G = torch.randn(5, 17, device=device), torch.randn(33, 17, device=device)
    out = torch.full((5, 33), float("nan"), device=device)  # poisoned: every element must be written
    res = tfl.influence_block(S, G, topk=3, out=out)
    ref, ref_top = influence_block_reference(S, G, k=3)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)  # float32, p = 17
    assert torch.equal(res.topk.result().largest_indices, ref_top.largest_indices)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base_S = torch.randn(40, 60, device=device)
    base_G = torch.randn(90, 50, device=device)
    S = base_S[::2, ::3]  # (20, 20), strided in both dimensions
    G = base_G[::3, :40:2]  # (30, 20)
    assert not S.is_contiguous() and not G.is_contiguous()
    got = tfl.influence_scores(S, G)
    ref, _ = influence_block_reference(S, G)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)  # float32, p = 20
    transposed = base_S[:20, :20].T  # column-major
    assert torch.allclose(tfl.influence_scores(transposed, G).double(),
                          influence_block_reference(transposed, G)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["S", "G"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_an_error(device, where, bad):
    S, G = torch.randn(6, 10, device=device), torch.randn(20, 10, device=device)
    (S if where == "S" else G)[2, 3] = bad
    # A NaN/inf in query row 2 spoils that row of scores; in training row 2, that column (global sample 2).
    first = "query row 2, sample 0" if where == "S" else "query row 0, sample 2"
    with pytest.raises(ValueError, match=f"NaN or inf \\(first at {first}\\)"):
        tfl.influence_scores(S, G)
    state = tfl.StreamingTopK(6, 3, device=device)
    state.update(S, G)
    with pytest.raises(ValueError, match="NaN or inf"):
        state.result()


def test_empty_inputs():
    S = torch.randn(0, 8)
    assert tfl.influence_scores(S, torch.randn(5, 8)).shape == (0, 5)
    state = tfl.StreamingTopK(3, 2)
    state.update(torch.randn(3, 8), torch.randn(0, 8))
    assert state.result().largest_indices.shape == (3, 0)
    # p = 0: every score is an exact zero, ties broken by index.
    res = _stream(torch.randn(2, 0), torch.randn(4, 0), 2, [4])
    assert res.largest_indices.tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize(
    "S,G,match",
    [
        (torch.randn(3, 4), torch.randn(5, 6), "same number of columns"),
        (torch.randn(3, 4), torch.randn(5, 4).double(), "same dtype"),
        (torch.randn(3, 4).int(), torch.randn(5, 4).int(), "dtype"),
        (torch.randn(3, 4, 1), torch.randn(5, 4), "must be 2-D"),
        (torch.randn(3, 4).half(), torch.randn(5, 4).half(), "on cpu"),
    ],
)
def test_bad_input_names_argument_and_values(S, G, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tfl.influence_scores(S, G)


def test_bad_state_arguments():
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        tfl.StreamingTopK(3, 0)
    state = tfl.StreamingTopK(3, 2)
    with pytest.raises(ValueError, match=r"S must be \(3, p\) torch.float32 on cpu, got \(4, 5\)"):
        state.update(torch.randn(4, 5), torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"out must be a \(3, 6\)"):
        state.update(torch.randn(3, 5), torch.randn(6, 5), out=torch.empty(3, 5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_topk_limit_follows_dtype_and_device(device, dtype):
    from torchfluence import _C, ops

    limit = ops.max_fused_topk(torch.device(device), dtype)
    if device == "cpu":
        assert limit is None
        return
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    acc_bytes = 8 if dtype == torch.float64 else 4
    assert 1 <= limit <= tfl.build_info()["max_fused_topk"]
    assert _C.influence_block_shared_bytes(limit, acc_bytes) <= optin
    if limit < tfl.build_info()["max_fused_topk"]:
        assert _C.influence_block_shared_bytes(limit + 1, acc_bytes) > optin
    # A fused state asked for more than the limit still gives the exact top-k (through the matmul route).
    S = torch.randn(70, 33, dtype=dtype, device=device)
    G = torch.randn(500, 33, dtype=dtype, device=device)
    k = tfl.build_info()["max_fused_topk"] + 3
    state = tfl.StreamingTopK(70, k, device=device, dtype=dtype, fused=True)
    state.update(S, G[:200])
    state.update(S, G[200:])
    expected = (S.double() @ G.double().T).topk(k, dim=1)
    assert torch.equal(state.result().largest_indices, expected.indices)
