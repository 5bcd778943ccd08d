"""The compiled ops are the validation boundary: exact results, and no bad tensor reaches a kernel.

topk_merge is compared with an independent float64 oracle (numpy lexsort over every
finite score seen). Every custom op passes ``torch.library.opcheck``. A table of bad
arguments runs in a subprocess, so that a kernel writing out of bounds (or crashing)
fails the test instead of taking pytest down; each bad call must raise TypeError or
ValueError naming the argument, and leave every byte around and inside the tensors it
was given untouched.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchfluence import ops
from torchfluence._native import _C

from .conftest import DEVICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE_DTYPES = [torch.float32, torch.float64]


# ---------------------------------------------------------------------------
# The oracle: every finite (score, global index) seen, sorted by the total order.


def _oracle(blocks, k):
    """The top-k of every finite score in `blocks`, a list of ((n_query, b) scores, offset).

    Returns {"largest"/"smallest": (values float64, indices int64)}, each (n_query, k);
    unfilled slots have index -1 (and value nan, never compared).
    """
    n_query = blocks[0][0].shape[0]
    values = np.concatenate([s.detach().cpu().double().numpy() for s, _ in blocks], axis=1)
    index = np.concatenate([np.arange(off, off + s.shape[1], dtype=np.int64) for s, off in blocks])
    out = {}
    for side, sign in (("largest", -1.0), ("smallest", 1.0)):
        vals = np.full((n_query, k), np.nan)
        idx = np.full((n_query, k), -1, dtype=np.int64)
        for q in range(n_query):
            finite = np.isfinite(values[q])
            v, i = values[q][finite], index[finite]
            order = np.lexsort((i, sign * v))[:k]  # primary: better value; ties: lower index
            vals[q, : len(order)], idx[q, : len(order)] = v[order], i[order]
        out[side] = (vals, idx)
    return out


def _state(n_query, k, dtype, device):
    return dict(
        largest_values=torch.full((n_query, k), -torch.inf, dtype=dtype, device=device),
        largest_indices=torch.full((n_query, k), -1, dtype=torch.int64, device=device),
        smallest_values=torch.full((n_query, k), torch.inf, dtype=dtype, device=device),
        smallest_indices=torch.full((n_query, k), -1, dtype=torch.int64, device=device),
        status=torch.zeros(3, dtype=torch.int64, device=device),
    )


def _merge(blocks, k, dtype, device):
    state = _state(blocks[0][0].shape[0], k, dtype, device)
    for scores, offset in blocks:
        ops.topk_merge(scores, offset, **state)
    return state


def _assert_matches_oracle(state, blocks, k):
    ref = _oracle(blocks, k)
    for side in ("largest", "smallest"):
        ref_values, ref_indices = ref[side]
        got_indices = state[f"{side}_indices"].cpu().numpy()
        assert np.array_equal(got_indices, ref_indices), side
        filled = ref_indices >= 0
        # Exact: the kernel only moves values, and the oracle's float64 holds every float32 exactly.
        got_values = state[f"{side}_values"].cpu().double().numpy()
        assert np.array_equal(got_values[filled], ref_values[filled]), side


def _blocks(n_query, sizes, dtype, device, *, offset=0, integers=False, gen=None):
    blocks, start = [], offset
    for b in sizes:
        if integers:
            scores = torch.randint(-3, 4, (n_query, b), generator=gen).to(dtype)
        else:
            scores = torch.randn(n_query, b, generator=gen, dtype=torch.float64).to(dtype)
        blocks.append((scores.to(device), start))
        start += b
    return blocks


CASES = {
    # name: (n_query, block sizes, k, first offset, integer scores)
    "random": (7, [64, 200, 37], 5, 0, False),
    "ties": (9, [50, 50, 50], 10, 0, True),
    "empty_and_tiny_blocks": (5, [0, 1, 64, 0, 85, 2], 4, 0, True),
    "k_one": (6, [40, 41, 300], 1, 0, True),
    "beyond_2_31": (4, [33, 1100, 7], 6, 2**31 + 5, False),
    "beyond_2_62": (3, [20, 20], 3, 2**62, True),
    "k_above_everything": (3, [4, 0, 5], 16, 0, False),
    "large_k": (4, [600, 900, 1500], 700, 10, True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_topk_merge_matches_oracle(device, dtype, case):
    n_query, sizes, k, offset, integers = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    blocks = _blocks(n_query, sizes, dtype, device, offset=offset, integers=integers, gen=gen)
    state = _merge(blocks, k, dtype, device)
    _assert_matches_oracle(state, blocks, k)
    assert state["status"].tolist() == [0, 0, 0]
    seen = sum(sizes)
    if seen < k:  # unfilled slots stay empty
        assert (state["largest_indices"][:, seen:] == -1).all() and (
            state["smallest_indices"][:, seen:] == -1
        ).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_topk_merge_is_independent_of_block_order(device, dtype):
    gen = torch.Generator().manual_seed(3)
    blocks = _blocks(6, [30, 1, 0, 77, 12, 50], dtype, device, offset=1000, integers=True, gen=gen)
    forward = _merge(blocks, 8, dtype, device)
    backward = _merge(blocks[::-1], 8, dtype, device)
    shuffled = _merge([blocks[i] for i in (3, 0, 5, 2, 4, 1)], 8, dtype, device)
    for other in (backward, shuffled):
        for name in ("largest_indices", "smallest_indices", "largest_values", "smallest_values"):
            assert torch.equal(forward[name], other[name]), name
    _assert_matches_oracle(forward, blocks, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_topk_merge_reads_any_strides(device, dtype):
    n_query = 5
    gen = torch.Generator().manual_seed(1)
    column_major = torch.randn(40, n_query, generator=gen).to(dtype).to(device).T
    every_other = torch.randint(-2, 3, (n_query, 66), generator=gen).to(dtype).to(device)[:, ::2]
    broadcast = (
        torch.randn(n_query, 1, generator=gen).to(dtype).to(device).expand(n_query, 25)
    )  # all ties in a row
    sliced_rows = torch.randn(2 * n_query, 17, generator=gen).to(dtype).to(device)[::2]
    blocks = [(column_major, 0), (every_other, 40), (broadcast, 73), (sliced_rows, 98)]
    assert not any(s.is_contiguous() for s, _ in blocks)
    state = _merge(blocks, 9, dtype, device)
    _assert_matches_oracle(state, [(s.contiguous(), off) for s, off in blocks], 9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_topk_merge_counts_nonfinite_and_never_ranks_them(device, dtype):
    gen = torch.Generator().manual_seed(2)
    first = torch.randn(3, 40, generator=gen).to(dtype)
    first[2, 0], first[1, 7], first[1, 39] = torch.nan, torch.inf, -torch.inf  # row-major first: (1, 7)
    second = torch.randn(3, 30, generator=gen).to(dtype)
    second[0, 4] = torch.nan
    blocks = [(first.to(device), 100), (second.to(device), 140)]
    state = _state(3, 50, dtype, device)  # k above the finite count: nothing non-finite may fill a slot
    ops.topk_merge(*blocks[0], **state)
    assert state["status"].tolist() == [3, 1, 107]
    ops.topk_merge(*blocks[1], **state)
    assert state["status"].tolist() == [4, 1, 107]  # the count accumulates, the first stays
    _assert_matches_oracle(state, blocks, 50)
    for name in ("largest_values", "smallest_values"):
        filled = state[name.replace("values", "indices")] >= 0
        assert torch.isfinite(state[name][filled]).all()
    with pytest.raises(
        ValueError,
        match=r"influence scores: 4 value\(s\) are NaN or inf \(first at query row 1, "
        r"sample 107\)",
    ):
        ops.raise_if_nonfinite(state["status"])
    ops.raise_if_nonfinite(_state(1, 1, dtype, device)["status"])  # a clean status passes


@pytest.mark.parametrize("device", DEVICES)
def test_topk_merge_empty_blocks_are_noops(device):
    state = _state(4, 3, torch.float32, device)
    before = {name: t.clone() for name, t in state.items()}
    ops.topk_merge(torch.empty(4, 0, device=device), 5, **state)
    for name, t in state.items():
        assert torch.equal(t, before[name]), name
    empty = _state(0, 3, torch.float32, device)
    ops.topk_merge(torch.empty(0, 9, device=device), 0, **empty)


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_fused_update_matches_topk_merge(dtype):
    # Small integers: S @ G.T is exact in both kernels, so the selections must agree bit for bit.
    gen = torch.Generator().manual_seed(4)
    S = torch.randint(-3, 4, (7, 11), generator=gen).to(dtype)
    G = torch.randint(-3, 4, (300, 11), generator=gen).to(dtype)
    G[17, 2] = torch.nan
    fused, merged = _state(7, 6, dtype, "cpu"), _state(7, 6, dtype, "cpu")
    scores = torch.empty(7, 300, dtype=dtype)
    ops.influence_block_update(S, G, 2**40, **fused, scores=scores)
    ops.topk_merge(S @ G.T, 2**40, **merged)
    assert torch.equal(scores.nan_to_num(), (S @ G.T).nan_to_num())
    for name in merged:
        assert torch.equal(fused[name], merged[name]), name
    assert fused["status"].tolist() == [7, 0, 2**40 + 17]


# ---------------------------------------------------------------------------
# torch.library: schema, fake kernels, tracing.


def _valid_args(op, device="cpu"):
    """Valid arguments for each custom op (small; float64 except where noted)."""
    gen = torch.Generator().manual_seed(5)

    def rand(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    state = _state(4, 3, torch.float64, device)
    if op == "topk_merge":
        return (rand(4, 6), 0, *state.values())
    if op == "influence_block_update":
        return (rand(4, 5), rand(6, 5), 0, *state.values(), rand(4, 6))
    if op == "psg_dot_accumulate":
        return (
            rand(4, 3 * 5),
            rand(6, 2, 5),
            rand(6, 2, 3),
            torch.zeros(4, 6, dtype=torch.float64, device=device),
        )
    if op == "linear_head_hvp_accumulate":
        return (
            rand(7, 4),
            rand(3, 4),
            rand(3),
            rand(2, 3, 5),
            "cross_entropy",
            7,
            torch.zeros(2, 3, 5, dtype=torch.float64, device=device),
        )
    raise KeyError(op)


OPS = ["topk_merge", "influence_block_update", "psg_dot_accumulate", "linear_head_hvp_accumulate"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_custom_ops_pass_opcheck(device, op):
    torch.library.opcheck(getattr(torch.ops.torchfluence, op).default, _valid_args(op, device))


def test_influence_block_update_opcheck_without_scores_and_in_float32():
    S, G = torch.randn(5, 7), torch.randn(9, 7)
    state = _state(5, 3, torch.float32, "cpu")
    torch.library.opcheck(
        torch.ops.torchfluence.influence_block_update.default, (S, G, 2**33, *state.values(), None)
    )


def test_topk_merge_under_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def merge_doubled(scores, offset, lv, li, sv, si, status):
        torch.ops.torchfluence.topk_merge(scores * 2, offset, lv, li, sv, si, status)
        return lv.sum()

    scores = torch.randn(4, 30)
    compiled, eager = _state(4, 5, torch.float32, "cpu"), _state(4, 5, torch.float32, "cpu")
    merge_doubled(scores, 7, *compiled.values())
    ops.topk_merge(scores * 2, 7, *eager.values())
    for name in eager:
        assert torch.equal(compiled[name], eager[name]), name


def test_scores_only_is_no_longer_an_op():
    # Scores alone are a plain matmul by the caller; the fused op always selects (k >= 1).
    assert not hasattr(ops, "influence_scores") and not hasattr(ops, "fill_scores")
    with pytest.raises(ValueError, match="k >= 1"):
        ops.influence_block_update(
            torch.randn(3, 4),
            torch.randn(5, 4),
            0,
            *_state(3, 0, torch.float32, "cpu").values(),
            torch.empty(3, 5),
        )


# ---------------------------------------------------------------------------
# The bad-argument table, run in a subprocess.
#
# Every tensor a case passes is a view into a "guarded" buffer: sentinel
# padding on both sides. After a refused call every byte of every buffer must
# be as before; after a valid call the padding must be.

_PAD = 16


class _Guards:
    def __init__(self):
        self.buffers = []

    def view(self, shape, dtype, fill, *, slice_cols=None, transpose=False):
        """A tensor of `shape` inside a padded buffer; with slice_cols, a column slice of a wider tensor."""
        full_shape = tuple(shape)
        if slice_cols is not None:
            full_shape = full_shape[:-1] + (slice_cols,)
        if transpose:
            full_shape = full_shape[::-1]
        n = int(np.prod(full_shape))
        buf = torch.full((n + 2 * _PAD,), 1234.5 if dtype.is_floating_point else -7777, dtype=dtype)
        inner = buf[_PAD : _PAD + n].view(full_shape)
        inner.fill_(fill)
        if transpose:
            inner = inner.T
        if slice_cols is not None:
            inner = inner[..., : shape[-1]]
        self.buffers.append((buf, buf.view(torch.uint8).clone()))
        return inner

    def untouched(self):
        return all(torch.equal(buf.view(torch.uint8), snap) for buf, snap in self.buffers)

    def pads_untouched(self):
        for buf, snap in self.buffers:
            raw, size = buf.view(torch.uint8), buf.element_size() * _PAD
            if not (torch.equal(raw[:size], snap[:size]) and torch.equal(raw[-size:], snap[-size:])):
                return False
        return True


def _table_cases():
    """(case name, op, build(guards) -> args, words the message must contain). Float64 inputs throughout."""
    f64, f32, i64, i32 = torch.float64, torch.float32, torch.int64, torch.int32
    inf = float("inf")

    def state(g, n=4, k=3, **override):
        s = dict(
            largest_values=g.view((n, k), f64, -inf),
            largest_indices=g.view((n, k), i64, -1),
            smallest_values=g.view((n, k), f64, inf),
            smallest_indices=g.view((n, k), i64, -1),
            status=g.view((3,), i64, 0),
        )
        s.update({name: make(g) for name, make in override.items()})
        return s

    def merge(scores=None, offset=0, **override):
        def build(g):
            sc = g.view((4, 6), f64, 0.5) if scores is None else scores(g)
            return (sc, offset, *state(g, **override).values())

        return build

    def block(S=None, G=None, offset=0, scores="ok", **override):
        def build(g):
            s = g.view((4, 5), f64, 0.25) if S is None else S(g)
            gg = g.view((6, 5), f64, 0.5) if G is None else G(g)
            out = g.view((4, 6), f64, 0.0) if scores == "ok" else (None if scores is None else scores(g))
            return (s, gg, offset, *state(g, **override).values(), out)

        return build

    def psg(Q=None, A=None, D=None, scores=None):
        def build(g):
            return (
                g.view((4, 15), f64, 0.1) if Q is None else Q(g),
                g.view((6, 2, 5), f64, 0.2) if A is None else A(g),
                g.view((6, 2, 3), f64, 0.3) if D is None else D(g),
                g.view((4, 6), f64, 0.0) if scores is None else scores(g),
            )

        return build

    def head(features=None, weight=None, bias="ok", vectors=None, loss="cross_entropy", n_total=7, out=None):
        def build(g):
            return (
                g.view((7, 4), f64, 0.1) if features is None else features(g),
                g.view((3, 4), f64, 0.2) if weight is None else weight(g),
                g.view((3,), f64, 0.3) if bias == "ok" else (None if bias is None else bias(g)),
                g.view((2, 3, 5), f64, 0.4) if vectors is None else vectors(g),
                loss,
                n_total,
                g.view((2, 3, 5), f64, 0.0) if out is None else out(g),
            )

        return build

    meta = torch.device("meta")
    cases = [
        # topk_merge
        (
            "merge: float32 largest_values",
            "topk_merge",
            merge(largest_values=lambda g: g.view((4, 3), f32, -inf)),
            ["largest_values", "torch.float64", "torch.float32"],
        ),
        (
            "merge: float32 smallest_values",
            "topk_merge",
            merge(smallest_values=lambda g: g.view((4, 3), f32, inf)),
            ["smallest_values"],
        ),
        (
            "merge: largest_values of the wrong rows",
            "topk_merge",
            merge(largest_values=lambda g: g.view((5, 3), f64, -inf)),
            ["largest_values", "(4, 3)"],
        ),
        (
            "merge: largest_indices of the wrong k",
            "topk_merge",
            merge(largest_indices=lambda g: g.view((4, 4), i64, -1)),
            ["largest_indices", "(4, 3)", "(4, 4)"],
        ),
        (
            "merge: smallest_indices of the wrong rows",
            "topk_merge",
            merge(smallest_indices=lambda g: g.view((3, 3), i64, -1)),
            ["smallest_indices"],
        ),
        (
            "merge: sliced largest_values",
            "topk_merge",
            merge(largest_values=lambda g: g.view((4, 3), f64, -inf, slice_cols=6)),
            ["largest_values", "contiguous"],
        ),
        (
            "merge: transposed smallest_indices",
            "topk_merge",
            merge(smallest_indices=lambda g: g.view((4, 3), i64, -1, transpose=True)),
            ["smallest_indices"],
        ),
        (
            "merge: k = 0",
            "topk_merge",
            merge(
                **{
                    n: (lambda g, n=n: g.view((4, 0), i64 if "ind" in n else f64, 0))
                    for n in ("largest_values", "largest_indices", "smallest_values", "smallest_indices")
                }
            ),
            ["k >= 1"],
        ),
        (
            "merge: int32 largest_indices",
            "topk_merge",
            merge(largest_indices=lambda g: g.view((4, 3), i32, -1)),
            ["largest_indices", "torch.int64", "torch.int32"],
        ),
        (
            "merge: float64 smallest_indices",
            "topk_merge",
            merge(smallest_indices=lambda g: g.view((4, 3), f64, -1)),
            ["smallest_indices"],
        ),
        (
            "merge: status of 2",
            "topk_merge",
            merge(status=lambda g: g.view((2,), i64, 0)),
            ["status", "(3,)"],
        ),
        ("merge: status of 4", "topk_merge", merge(status=lambda g: g.view((4,), i64, 0)), ["status"]),
        (
            "merge: int32 status",
            "topk_merge",
            merge(status=lambda g: g.view((3,), i32, 0)),
            ["status", "torch.int64"],
        ),
        ("merge: float64 status", "topk_merge", merge(status=lambda g: g.view((3,), f64, 0)), ["status"]),
        (
            "merge: strided status",
            "topk_merge",
            merge(status=lambda g: g.view((6,), i64, 0)[::2]),
            ["status"],
        ),
        ("merge: 2-D status", "topk_merge", merge(status=lambda g: g.view((1, 3), i64, 0)), ["status"]),
        ("merge: status None", "topk_merge", merge(status=lambda g: None), ["status", "NoneType"]),
        (
            "merge: scores on meta",
            "topk_merge",
            merge(scores=lambda g: torch.empty(4, 6, dtype=f64, device=meta)),
            ["scores", "meta"],
        ),
        (
            "merge: largest_values on meta",
            "topk_merge",
            merge(largest_values=lambda g: torch.empty(4, 3, dtype=f64, device=meta)),
            ["largest_values", "meta"],
        ),
        (
            "merge: status on meta",
            "topk_merge",
            merge(status=lambda g: torch.zeros(3, dtype=i64, device=meta)),
            ["status", "meta"],
        ),
        ("merge: negative offset", "topk_merge", merge(offset=-1), ["offset", ">= 0"]),
        ("merge: offset + b overflows", "topk_merge", merge(offset=2**63 - 3), ["offset", "int64"]),
        ("merge: offset beyond int64", "topk_merge", merge(offset=2**63), ["offset"]),
        ("merge: float offset", "topk_merge", merge(offset=1.5), ["offset", "int"]),
        ("merge: bool offset", "topk_merge", merge(offset=True), ["offset", "int"]),
        ("merge: str offset", "topk_merge", merge(offset="3"), ["offset"]),
        (
            "merge: 1-D scores",
            "topk_merge",
            merge(scores=lambda g: g.view((6,), f64, 0.5)),
            ["scores", "2-D"],
        ),
        ("merge: 3-D scores", "topk_merge", merge(scores=lambda g: g.view((1, 4, 6), f64, 0.5)), ["scores"]),
        ("merge: int64 scores", "topk_merge", merge(scores=lambda g: g.view((4, 6), i64, 1)), ["scores"]),
        (
            "merge: float16 scores",
            "topk_merge",
            merge(scores=lambda g: torch.zeros(4, 6, dtype=torch.float16)),
            ["scores"],
        ),
        (
            "merge: float32 scores, float64 state",
            "topk_merge",
            merge(scores=lambda g: g.view((4, 6), f32, 0.5)),
            ["largest_values", "torch.float32"],
        ),
        (
            "merge: sparse scores",
            "topk_merge",
            merge(scores=lambda g: torch.ones(4, 6, dtype=f64).to_sparse()),
            ["scores"],
        ),
        ("merge: list scores", "topk_merge", merge(scores=lambda g: [[0.0] * 6] * 4), ["scores", "list"]),
        (
            "merge: numpy largest_values",
            "topk_merge",
            merge(largest_values=lambda g: np.full((4, 3), -np.inf)),
            ["largest_values", "ndarray"],
        ),
        (
            "merge: 3-D largest_values",
            "topk_merge",
            merge(largest_values=lambda g: g.view((4, 3, 1), f64, -inf)),
            ["largest_values"],
        ),
        # influence_block_update
        (
            "block: float32 largest_values, float64 inputs",
            "influence_block_update",
            block(largest_values=lambda g: g.view((4, 3), f32, -inf)),
            ["largest_values", "torch.float32"],
        ),
        (
            "block: float32 smallest_values",
            "influence_block_update",
            block(smallest_values=lambda g: g.view((4, 3), f32, inf)),
            ["smallest_values"],
        ),
        (
            "block: int32 largest_indices",
            "influence_block_update",
            block(largest_indices=lambda g: g.view((4, 3), i32, -1)),
            ["largest_indices"],
        ),
        (
            "block: sliced smallest_values",
            "influence_block_update",
            block(smallest_values=lambda g: g.view((4, 3), f64, inf, slice_cols=5)),
            ["smallest_values"],
        ),
        (
            "block: state of the wrong rows",
            "influence_block_update",
            block(
                **{
                    n: (lambda g, n=n: g.view((3, 3), i64 if "ind" in n else f64, 0))
                    for n in ("largest_values", "largest_indices", "smallest_values", "smallest_indices")
                }
            ),
            ["largest_values", "(4, 3)", "(3, 3)"],
        ),
        (
            "block: k = 0",
            "influence_block_update",
            block(
                **{
                    n: (lambda g, n=n: g.view((4, 0), i64 if "ind" in n else f64, 0))
                    for n in ("largest_values", "largest_indices", "smallest_values", "smallest_indices")
                }
            ),
            ["k >= 1"],
        ),
        (
            "block: status of 2",
            "influence_block_update",
            block(status=lambda g: g.view((2,), i64, 0)),
            ["status"],
        ),
        (
            "block: int32 status",
            "influence_block_update",
            block(status=lambda g: g.view((3,), i32, 0)),
            ["status"],
        ),
        (
            "block: float32 scores",
            "influence_block_update",
            block(scores=lambda g: g.view((4, 6), f32, 0)),
            ["scores", "torch.float64"],
        ),
        (
            "block: scores of the wrong shape",
            "influence_block_update",
            block(scores=lambda g: g.view((4, 5), f64, 0)),
            ["scores", "(4, 6)"],
        ),
        (
            "block: overlapping scores",
            "influence_block_update",
            block(scores=lambda g: g.view((4, 1), f64, 0).expand(4, 6)),
            ["scores", "overlapping"],
        ),
        (
            "block: scores on meta",
            "influence_block_update",
            block(scores=lambda g: torch.empty(4, 6, dtype=f64, device=meta)),
            ["scores", "meta"],
        ),
        (
            "block: S float32, G float64",
            "influence_block_update",
            block(S=lambda g: g.view((4, 5), f32, 0.25)),
            ["S and G", "dtype"],
        ),
        (
            "block: G of other columns",
            "influence_block_update",
            block(G=lambda g: g.view((6, 7), f64, 0.5)),
            ["S and G", "columns"],
        ),
        (
            "block: 3-D S",
            "influence_block_update",
            block(S=lambda g: g.view((4, 5, 1), f64, 0.25)),
            ["S", "2-D"],
        ),
        ("block: 1-D G", "influence_block_update", block(G=lambda g: g.view((5,), f64, 0.5)), ["G", "2-D"]),
        ("block: int G", "influence_block_update", block(G=lambda g: g.view((6, 5), i64, 1)), ["G", "dtype"]),
        (
            "block: G on meta",
            "influence_block_update",
            block(G=lambda g: torch.empty(6, 5, dtype=f64, device=meta)),
            ["G", "meta"],
        ),
        ("block: list S", "influence_block_update", block(S=lambda g: [[0.0] * 5] * 4), ["S", "list"]),
        ("block: negative offset", "influence_block_update", block(offset=-5), ["offset", ">= 0"]),
        (
            "block: offset + b overflows",
            "influence_block_update",
            block(offset=2**63 - 2),
            ["offset", "int64"],
        ),
        (
            "block: status on meta",
            "influence_block_update",
            block(status=lambda g: torch.zeros(3, dtype=i64, device=meta)),
            ["status", "meta"],
        ),
        # psg_dot_accumulate
        (
            "psg: float32 scores",
            "psg_dot_accumulate",
            psg(scores=lambda g: g.view((4, 6), f32, 0)),
            ["scores", "torch.float64", "torch.float32"],
        ),
        (
            "psg: scores of the wrong shape",
            "psg_dot_accumulate",
            psg(scores=lambda g: g.view((4, 5), f64, 0)),
            ["scores", "(4, 6)"],
        ),
        (
            "psg: overlapping scores",
            "psg_dot_accumulate",
            psg(scores=lambda g: g.view((1, 6), f64, 0).expand(4, 6)),
            ["scores", "overlapping"],
        ),
        ("psg: 1-D scores", "psg_dot_accumulate", psg(scores=lambda g: g.view((24,), f64, 0)), ["scores"]),
        (
            "psg: scores on meta",
            "psg_dot_accumulate",
            psg(scores=lambda g: torch.empty(4, 6, dtype=f64, device=meta)),
            ["scores", "meta"],
        ),
        ("psg: scores None", "psg_dot_accumulate", psg(scores=lambda g: None), ["scores", "NoneType"]),
        (
            "psg: Q of the wrong width",
            "psg_dot_accumulate",
            psg(Q=lambda g: g.view((4, 14), f64, 0.1)),
            ["Q", "columns"],
        ),
        (
            "psg: A and D disagree in b",
            "psg_dot_accumulate",
            psg(A=lambda g: g.view((5, 2, 5), f64, 0.2)),
            ["A", "D"],
        ),
        ("psg: 2-D A", "psg_dot_accumulate", psg(A=lambda g: g.view((6, 5), f64, 0.2)), ["A", "3-D"]),
        (
            "psg: float32 D",
            "psg_dot_accumulate",
            psg(D=lambda g: g.view((6, 2, 3), f32, 0.3)),
            ["D", "dtype"],
        ),
        (
            "psg: D on meta",
            "psg_dot_accumulate",
            psg(D=lambda g: torch.empty(6, 2, 3, dtype=f64, device=meta)),
            ["D", "meta"],
        ),
        ("psg: list Q", "psg_dot_accumulate", psg(Q=lambda g: [0.0]), ["Q", "list"]),
        # linear_head_hvp_accumulate
        (
            "head: float32 out",
            "linear_head_hvp_accumulate",
            head(out=lambda g: g.view((2, 3, 5), f32, 0)),
            ["out", "torch.float64", "torch.float32"],
        ),
        (
            "head: out without the bias column",
            "linear_head_hvp_accumulate",
            head(out=lambda g: g.view((2, 3, 4), f64, 0)),
            ["out", "(2, 3, 5)"],
        ),
        (
            "head: sliced out",
            "linear_head_hvp_accumulate",
            head(out=lambda g: g.view((2, 3, 5), f64, 0, slice_cols=10)),
            ["out", "contiguous"],
        ),
        (
            "head: out on meta",
            "linear_head_hvp_accumulate",
            head(out=lambda g: torch.empty(2, 3, 5, dtype=f64, device=meta)),
            ["out", "meta"],
        ),
        (
            "head: sliced vectors",
            "linear_head_hvp_accumulate",
            head(vectors=lambda g: g.view((2, 3, 5), f64, 0.4, slice_cols=7)),
            ["vectors", "contiguous"],
        ),
        (
            "head: float32 vectors",
            "linear_head_hvp_accumulate",
            head(vectors=lambda g: g.view((2, 3, 5), f32, 0.4)),
            ["vectors"],
        ),
        (
            "head: 2-D vectors",
            "linear_head_hvp_accumulate",
            head(vectors=lambda g: g.view((6, 5), f64, 0.4)),
            ["vectors"],
        ),
        (
            "head: bias of 4",
            "linear_head_hvp_accumulate",
            head(bias=lambda g: g.view((4,), f64, 0.3)),
            ["bias", "(3,)"],
        ),
        (
            "head: strided bias",
            "linear_head_hvp_accumulate",
            head(bias=lambda g: g.view((6,), f64, 0.3)[::2]),
            ["bias", "contiguous"],
        ),
        (
            "head: float32 bias",
            "linear_head_hvp_accumulate",
            head(bias=lambda g: g.view((3,), f32, 0.3)),
            ["bias"],
        ),
        (
            "head: no bias, out with a bias column",
            "linear_head_hvp_accumulate",
            head(bias=None),
            ["vectors", "(2, 3, 4)"],
        ),
        ("head: unknown loss", "linear_head_hvp_accumulate", head(loss="hinge"), ["loss", "hinge"]),
        ("head: int loss", "linear_head_hvp_accumulate", head(loss=3), ["loss"]),
        ("head: n_total 0", "linear_head_hvp_accumulate", head(n_total=0), ["n_total", ">= 1"]),
        ("head: float n_total", "linear_head_hvp_accumulate", head(n_total=2.5), ["n_total", "int"]),
        ("head: n_total beyond int64", "linear_head_hvp_accumulate", head(n_total=2**64), ["n_total"]),
        (
            "head: float16 features",
            "linear_head_hvp_accumulate",
            head(features=lambda g: torch.zeros(7, 4, dtype=torch.float16)),
            ["features", "dtype"],
        ),
        (
            "head: weight of other width",
            "linear_head_hvp_accumulate",
            head(weight=lambda g: g.view((3, 5), f64, 0.2)),
            ["weight", "columns"],
        ),
        (
            "head: weight on meta",
            "linear_head_hvp_accumulate",
            head(weight=lambda g: torch.empty(3, 4, dtype=f64, device=meta)),
            ["weight", "meta"],
        ),
        (
            "head: list features",
            "linear_head_hvp_accumulate",
            head(features=lambda g: [[0.0] * 4]),
            ["features", "list"],
        ),
    ]
    return cases


def _c_layer_cases():
    """The same kind of bad state handed straight to `_C` (past the Python checks): C++ must refuse it too."""
    f64, f32, i64 = torch.float64, torch.float32, torch.int64
    inf = float("inf")
    from torchfluence.ops._common import matrix_ref as M
    from torchfluence.ops._common import tensor3_ref as T3
    from torchfluence.ops._common import vector_ref as V

    def topk(g, **override):
        s = dict(
            lv=g.view((4, 3), f64, -inf),
            li=g.view((4, 3), i64, -1),
            sv=g.view((4, 3), f64, inf),
            si=g.view((4, 3), i64, -1),
        )
        s.update({n: make(g) for n, make in override.items()})
        return _C.TopKRef(M(s["lv"]), M(s["li"]), M(s["sv"]), M(s["si"]))

    def merge(offset=0, status=None, **override):
        def call(g):
            st = g.view((3,), i64, 0) if status is None else status(g)
            _C.topk_merge_cpu(
                _C.TopKMergeArgs(M(g.view((4, 6), f64, 0.5)), offset, topk(g, **override), V(st))
            )

        return call

    def block(scores=None, offset=0, **override):
        def call(g):
            out = g.view((4, 6), f64, 0) if scores is None else scores(g)
            args = _C.InfluenceBlockArgs(
                1,
                M(g.view((4, 5), f64, 0.25)),
                M(g.view((6, 5), f64, 0.5)),
                offset,
                M(out),
                topk(g, **override),
                V(g.view((3,), i64, 0)),
            )
            _C.influence_block_cpu(args)

        return call

    def psg(scores):
        def call(g):
            _C.psg_dot_cpu(
                _C.PsgDotArgs(
                    1,
                    M(g.view((4, 15), f64, 0.1)),
                    T3(g.view((6, 2, 5), f64, 0.2)),
                    T3(g.view((6, 2, 3), f64, 0.3)),
                    M(scores(g)),
                )
            )

        return call

    def head(out=None, bias=None):
        def call(g):
            b = g.view((3,), f64, 0.3) if bias is None else bias(g)
            o = g.view((2, 3, 5), f64, 0) if out is None else out(g)
            _C.linear_head_hvp_cpu(
                _C.LinearHeadArgs(
                    1,
                    0,
                    M(g.view((7, 4), f64, 0.1)),
                    M(g.view((3, 4), f64, 0.2)),
                    V(b),
                    T3(g.view((2, 3, 5), f64, 0.4)),
                    T3(o),
                    7,
                    0,
                    0,
                )
            )

        return call

    return [
        (
            "C: merge float32 largest_values",
            merge(lv=lambda g: g.view((4, 3), f32, -inf)),
            ["largest_values"],
        ),
        (
            "C: merge sliced smallest_indices",
            merge(si=lambda g: g.view((4, 3), i64, -1, slice_cols=5)),
            ["smallest_indices", "contiguous"],
        ),
        ("C: merge wrong rows", merge(li=lambda g: g.view((5, 3), i64, -1)), ["largest_indices"]),
        (
            "C: merge k = 0",
            merge(
                **{
                    n: (lambda g, n=n: g.view((4, 0), i64 if n[1] == "i" else f64, 0))
                    for n in ("lv", "li", "sv", "si")
                }
            ),
            ["k >= 1"],
        ),
        ("C: merge status of 2", merge(status=lambda g: g.view((2,), i64, 0)), ["status"]),
        ("C: merge float64 status", merge(status=lambda g: g.view((3,), f64, 0)), ["status"]),
        ("C: merge negative offset", merge(offset=-1), ["offset"]),
        ("C: merge offset overflow", merge(offset=2**63 - 2), ["offset"]),
        (
            "C: block float32 largest_values",
            block(lv=lambda g: g.view((4, 3), f32, -inf)),
            ["largest_values"],
        ),
        ("C: block float32 scores", block(scores=lambda g: g.view((4, 6), f32, 0)), ["scores"]),
        (
            "C: block overlapping scores",
            block(scores=lambda g: g.view((4, 1), f64, 0).expand(4, 6)),
            ["scores"],
        ),
        ("C: block wrong-shape scores", block(scores=lambda g: g.view((4, 5), f64, 0)), ["scores"]),
        ("C: psg float32 scores", psg(lambda g: g.view((4, 6), f32, 0)), ["scores"]),
        ("C: psg wrong-shape scores", psg(lambda g: g.view((3, 6), f64, 0)), ["scores"]),
        ("C: head sliced out", head(out=lambda g: g.view((2, 3, 5), f64, 0, slice_cols=6)), ["out"]),
        ("C: head float32 out", head(out=lambda g: g.view((2, 3, 5), f32, 0)), ["out"]),
        ("C: head bias of 4", head(bias=lambda g: g.view((4,), f64, 0.3)), ["bias"]),
    ]


def _run_bad_argument_table() -> None:
    """Runs every case (in this process) and prints one JSON line per case; a crash stops at 'start'."""

    def report(**fields):
        print(json.dumps(fields), flush=True)

    for op in OPS:  # the valid calls work and write nothing outside their tensors
        g = _Guards()
        args = dict(_table_cases_valid(g))[op]
        report(start=f"valid {op}")
        getattr(ops, op)(*args)
        report(case=f"valid {op}", raised=None, message="", untouched=g.pads_untouched())

    calls = [
        (name, lambda args, op=op: getattr(ops, op)(*args), build, words)
        for name, op, build, words in _table_cases()
    ]
    calls += [(name, lambda _args: None, build, words) for name, build, words in _c_layer_cases()]
    for name, call, build, words in calls:
        g = _Guards()
        report(start=name)
        try:
            call(build(g))
        except Exception as exc:  # reported, judged by the test
            report(
                case=name, raised=type(exc).__name__, message=str(exc), words=words, untouched=g.untouched()
            )
        else:
            report(case=name, raised=None, message="", words=words, untouched=g.untouched())


def _table_cases_valid(g):
    f64, i64, inf = torch.float64, torch.int64, float("inf")
    state = (
        g.view((4, 3), f64, -inf),
        g.view((4, 3), i64, -1),
        g.view((4, 3), f64, inf),
        g.view((4, 3), i64, -1),
        g.view((3,), i64, 0),
    )
    return [
        ("topk_merge", (g.view((4, 6), f64, 0.5), 2**40, *state)),
        (
            "influence_block_update",
            (g.view((4, 5), f64, 0.25), g.view((6, 5), f64, 0.5), 0, *state, g.view((4, 6), f64, 0)),
        ),
        (
            "psg_dot_accumulate",
            (
                g.view((4, 15), f64, 0.1),
                g.view((6, 2, 5), f64, 0.2),
                g.view((6, 2, 3), f64, 0.3),
                g.view((4, 6), f64, 0),
            ),
        ),
        (
            "linear_head_hvp_accumulate",
            (
                g.view((7, 4), f64, 0.1),
                g.view((3, 4), f64, 0.2),
                g.view((3,), f64, 0.3),
                g.view((2, 3, 5), f64, 0.4),
                "cross_entropy",
                7,
                g.view((2, 3, 5), f64, 0),
            ),
        ),
    ]


def test_bad_arguments_are_refused_without_writing():
    proc = subprocess.run(
        [sys.executable, "-c", "from tests.test_ops_boundary import _run_bad_argument_table as run; run()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [line["start"] for line in lines if "start" in line]
    assert proc.returncode == 0, (
        f"the table's process died (exit {proc.returncode}) during {started[-1] if started else '?'!r}:\n"
        f"{proc.stderr[-3000:]}"
    )
    results = [line for line in lines if "case" in line]
    assert len(results) == len(started) and len(results) > 100
    problems = []
    for r in results:
        if r["case"].startswith("valid "):
            if r["raised"] is not None or not r["untouched"]:
                problems.append(f"{r['case']}: valid call raised {r['raised']} or wrote outside its tensors")
            continue
        if r["raised"] not in ("TypeError", "ValueError"):
            problems.append(f"{r['case']}: expected TypeError/ValueError, got {r['raised']}: {r['message']}")
        elif not all(word in r["message"] for word in r["words"]):
            problems.append(f"{r['case']}: message lacks {r['words']}: {r['message']}")
        elif r["case"].split(":")[0] not in ("C",) and not r["message"].startswith(
            ("topk_merge:", "influence_block_update:", "psg_dot_accumulate:", "linear_head_hvp_accumulate:")
        ):
            problems.append(f"{r['case']}: message does not name the op: {r['message']}")
        if not r["untouched"]:
            problems.append(f"{r['case']}: the refused call wrote memory")
    assert not problems, "\n".join(problems)
