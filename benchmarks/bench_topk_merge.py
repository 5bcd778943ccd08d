"""topk_merge against plain-PyTorch merges of a score block into running top-k lists.

A stream of score blocks (n_query, b) is merged into the k largest and k smallest
scores per query row, as a streaming top-k over the influence matrix does. Paths:

- ``topk_merge``: the compiled op (a prefilter against each row's current k-th
  entry, then an exact merge), one call per block;
- ``cat + topk``: ``torch.cat`` of the state and the block, ``torch.topk`` and a
  gather, per side. Ties between equal scores are not ordered by index, so it is
  checked on values only;
- ``cat + stable sort``: the exact plain-PyTorch equivalent of the op's order
  (better value first, lower global index on ties): a stable sort by index, then
  a stable sort by value.

Every path is checked against the op before it is timed (the stable sort exactly,
values and indices; topk on values). Times are per block, the median over repeats
of a whole stream merged into a fresh state (the first block of a stream fills the
lists, later ones are mostly rejected by the prefilter), after a warm-up stream.
They include each call's Python and dispatcher overhead.

    python benchmarks/bench_topk_merge.py [--device cuda] [--threads N] [--blocks 4] [--repeats 5]
                                          [--markdown FILE]

On a shared CPU, ``--threads 1`` gives the steadiest numbers: a parallel region
waits for its slowest thread, so one descheduled thread stalls a whole call.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, median_seconds, print_table  # noqa: E402
from torchfluence import ops  # noqa: E402

SHAPES = [(100, 1024), (256, 4096), (512, 8192)]  # (n_query, b)
KS = [10, 100]
DTYPES = [torch.float32, torch.float64]


def fresh_state(n_query: int, k: int, dtype: torch.dtype, device: torch.device) -> dict:
    return dict(
        largest_values=torch.full((n_query, k), -torch.inf, dtype=dtype, device=device),
        largest_indices=torch.full((n_query, k), -1, dtype=torch.int64, device=device),
        smallest_values=torch.full((n_query, k), torch.inf, dtype=dtype, device=device),
        smallest_indices=torch.full((n_query, k), -1, dtype=torch.int64, device=device),
        status=torch.zeros(3, dtype=torch.int64, device=device),
    )


def run_op(blocks, k):
    state = fresh_state(blocks[0][0].shape[0], k, blocks[0][0].dtype, blocks[0][0].device)
    for scores, offset in blocks:
        ops.topk_merge(scores, offset, **state)
    return state


def _block_indices(scores: torch.Tensor, offset: int) -> torch.Tensor:
    n_query, b = scores.shape
    return torch.arange(offset, offset + b, device=scores.device).expand(n_query, b)


def run_topk(blocks, k):
    """cat + torch.topk per side (empty slots hold -inf / +inf, so they lose to every finite score)."""
    state = fresh_state(blocks[0][0].shape[0], k, blocks[0][0].dtype, blocks[0][0].device)
    for scores, offset in blocks:
        idx = _block_indices(scores, offset)
        for side, largest in (("largest", True), ("smallest", False)):
            values = torch.cat([state[f"{side}_values"], scores], dim=1)
            indices = torch.cat([state[f"{side}_indices"], idx], dim=1)
            top, pos = torch.topk(values, k, dim=1, largest=largest, sorted=True)
            state[f"{side}_values"], state[f"{side}_indices"] = top, indices.gather(1, pos)
    return state


def run_sort(blocks, k):
    """cat + two stable sorts per side: by index (empty slots last), then by value."""
    state = fresh_state(blocks[0][0].shape[0], k, blocks[0][0].dtype, blocks[0][0].device)
    for scores, offset in blocks:
        idx = _block_indices(scores, offset)
        for side, descending in (("largest", True), ("smallest", False)):
            values = torch.cat([state[f"{side}_values"], scores], dim=1)
            indices = torch.cat([state[f"{side}_indices"], idx], dim=1)
            key = torch.where(indices < 0, torch.iinfo(torch.int64).max, indices)
            by_index = torch.sort(key, dim=1, stable=True).indices
            values, indices = values.gather(1, by_index), indices.gather(1, by_index)
            by_value = torch.sort(values, dim=1, descending=descending, stable=True).indices[:, :k]
            state[f"{side}_values"], state[f"{side}_indices"] = (
                values.gather(1, by_value),
                indices.gather(1, by_value),
            )
    return state


def make_blocks(n_query: int, b: int, n_blocks: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    offset = 3 * 2**31  # global indices beyond int32, as in a large training set
    return [
        (torch.randn(n_query, b, generator=g, dtype=dtype).to(device), offset + i * b)
        for i in range(n_blocks)
    ]


def check(blocks, k) -> None:
    op, topk, exact = run_op(blocks, k), run_topk(blocks, k), run_sort(blocks, k)
    assert op["status"].tolist() == [0, 0, 0]
    for side in ("largest", "smallest"):
        for name in (f"{side}_values", f"{side}_indices"):
            if not torch.equal(op[name], exact[name]):
                raise AssertionError(f"topk_merge and the stable-sort merge disagree on {name}")
        if not torch.equal(op[f"{side}_values"], topk[f"{side}_values"]):
            raise AssertionError(f"topk_merge and the torch.topk merge disagree on {side}_values")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per stream")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch and the kernels (default: torch's)"
    )
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # torch and the extension share one OpenMP runtime
    rows = []
    for n_query, b in SHAPES:
        for k in KS:
            for dtype in DTYPES:
                blocks = make_blocks(n_query, b, args.blocks, dtype, device)
                check(blocks, k)
                seconds = {
                    name: median_seconds(
                        lambda fn=fn, blocks=blocks, k=k: fn(blocks, k), device, repeats=args.repeats
                    )
                    / args.blocks
                    for name, fn in (("op", run_op), ("topk", run_topk), ("sort", run_sort))
                }
                rows.append(
                    [
                        f"{n_query} x {b}",
                        str(k),
                        str(dtype).replace("torch.", ""),
                        f"{seconds['op'] * 1e3:.3f}",
                        f"{seconds['topk'] * 1e3:.3f}",
                        f"{seconds['topk'] / seconds['op']:.1f}x",
                        f"{seconds['sort'] * 1e3:.3f}",
                        f"{seconds['sort'] / seconds['op']:.1f}x",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
    env = environment(device)
    print(env)
    text = print_table(
        [
            "n_query x b",
            "k",
            "dtype",
            "topk_merge ms/block",
            "cat + topk ms/block",
            "speed-up vs topk",
            "cat + stable sort ms/block",
            "speed-up vs sort",
        ],
        rows,
    )
    if args.markdown:
        Path(args.markdown).write_text(f"{env}\n\n{text}\n")


if __name__ == "__main__":
    main()
