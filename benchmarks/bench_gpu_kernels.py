"""GPU kernel benchmarks: the device's ceilings, topk_merge, scoring blocks and psg_dot.

    python benchmarks/bench_gpu_kernels.py [--quick] [--markdown FILE] [--json FILE]

Sections (each one runs even when another fails; failures are listed at the end):

- ceilings: a device-to-device copy (bandwidth counted as bytes read + bytes
  written) and 8192^3 matrix products in bfloat16, float16, float32 with TF32,
  float32 IEEE and float64;
- topk_merge: float32 score blocks (n_query x b) merged into running top-k lists,
  as a stream of distinct random blocks; the first block of a stream fills the
  lists, the steady state is the median over the later blocks. Its rate is the
  bytes of scores read per second, compared with the copy's stream rate ((read +
  write) bytes per second): a merge that reads its block once at the copy's rate
  scores 100%. ``torch.topk`` (both ends) on the same blocks for comparison. The
  merged lists are checked against the whole matrix: exactly (values and
  indices, ties by lower index) against ``torchfluence.reference`` on smaller
  blocks of random and of integer-valued (tied) scores, and on values (plus
  indices pointing at them) for the timed streams;
- scoring: queries (n_query, p) against training blocks (b, p): (a) the GEMM
  alone, bfloat16 operands with float32 scores and float32 IEEE, and (b) the
  GEMM followed by topk_merge into running lists; TFLOP/s and the ratio (b)/(a),
  with the ratio a merge reading the scores once at the copy's rate would give.
  The opt-in fused kernel (``ops.influence_block_update``) at p = 1024 for comparison;
- psg_dot: ``torchfluence.captured_scores.psg_dot`` for a ResNet-9 conv layer and a Linear
  layer, in float32 (IEEE) and bfloat16; effective TFLOP/s counts the per-sample
  gradient formation (2 T d_in d_out n) and the contraction (2 n_query d_in d_out n);
  relative error against a float64 reference on a slice.

Times are medians of CUDA-event intervals after warm-up. Inputs are random
(never zeros), and every timed call rotates among at least two sets of input
buffers, so that no call finds its inputs left in the L2 cache by the previous
one (except the scoring queries, which stay resident in practice too). Prints
compact tables last; --json gets every number.
On a machine without a CUDA device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_topk_merge import fresh_state  # noqa: E402

GEMM_N = 8192
TOPK_SHAPES = [(2000, 65536), (512, 262144)]  # (n_query, b)
TOPK_KS = [10, 100]
SCORING_PS = [1024, 4096, 16384]
SCORING_NQ, SCORING_B = 2048, 32768
PSG_SHAPES = {  # name: (n_query, n, T, d_in, d_out)
    "conv 3x3 64->128 (ResNet-9)": (512, 512, 256, 576, 128),
    "linear 1024->1024": (512, 4096, 1, 1024, 1024),
}


# ---------------------------------------------------------------------------- timing


def cuda_times(fn: Callable[[int], object], reps: int, warmup: int = 2,
               before: Callable[[int], object] | None = None) -> list[float]:
    """Milliseconds of fn(i) for i in 0..reps-1, each between two CUDA events, after `warmup` calls.

    `before(i)`, if given, is queued ahead of each timed call, outside the events.
    """
    for i in range(warmup):
        if before is not None:
            before(i)
        fn(i)
    torch.cuda.synchronize()
    events = [tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        if before is not None:
            before(i)
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def stats(times: list[float]) -> dict:
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), n=len(times))


def stream_times(step: Callable[[int], object], state: dict, n_blocks: int,
                 streams: int) -> tuple[dict, dict]:
    """Times step(j) for the blocks j = 0..n_blocks-1 of `streams` streams (after one warm-up stream).

    Each stream starts from an empty top-k state, so block 0 fills the lists; the
    later blocks are the steady state. Returns (fill, steady) statistics.
    """
    blocks = [j for _ in range(streams + 1) for j in range(n_blocks)]

    def before(i):
        if blocks[i] == 0:
            reset_state(state)

    times = cuda_times(lambda i: step(blocks[i]), reps=len(blocks), warmup=0, before=before)
    timed = list(zip(times, blocks))[n_blocks:]
    return stats([t for t, j in timed if j == 0]), stats([t for t, j in timed if j > 0])


@contextlib.contextmanager
def float32_matmul(tf32: bool):
    """CUDA float32 matmuls in TF32 (True) or IEEE (False); the previous setting is restored."""
    matmul = torch.backends.cuda.matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = matmul.allow_tf32
        matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.allow_tf32 = previous


def free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------- ceilings


def copy_step(dst, srcs, i):
    dst.copy_(srcs[i % len(srcs)])


def gemm_step(pairs, out, i):
    torch.mm(*pairs[i % len(pairs)], out=out)


def bench_ceilings(dev, quick: bool) -> dict:
    res = {}
    n = (64 if quick else 256) << 20  # float32 elements per buffer: 256 MiB or 1 GiB
    srcs = [torch.randn(n, device=dev) for _ in range(2)]
    dst = torch.empty(n, device=dev)
    t = stats(cuda_times(functools.partial(copy_step, dst, srcs), reps=10 if quick else 30))
    moved = 2 * n * 4
    res["copy"] = dict(t, bytes_read_plus_written=moved, GBps=moved / t["median_ms"] / 1e6,
                       read_GBps=moved / 2 / t["median_ms"] / 1e6)
    del srcs, dst
    free()

    flops = 2 * GEMM_N**3
    for name, dtype, tf32, reps in (("bf16", torch.bfloat16, None, 30),
                                    ("fp16", torch.float16, None, 30),
                                    ("fp32 tf32", torch.float32, True, 20),
                                    ("fp32 ieee", torch.float32, False, 10),
                                    ("fp64", torch.float64, None, 10)):
        pairs = [tuple(torch.randn(GEMM_N, GEMM_N, device=dev).to(dtype) for _ in range(2)) for _ in range(2)]
        out = torch.empty(GEMM_N, GEMM_N, device=dev, dtype=dtype)
        with float32_matmul(tf32) if tf32 is not None else contextlib.nullcontext():
            step = functools.partial(gemm_step, pairs, out)
            t = stats(cuda_times(step, reps=max(4, reps // (3 if quick else 1))))
        res[f"gemm {name}"] = dict(t, TFLOPs=flops / t["median_ms"] / 1e9, n=GEMM_N)
        del pairs, out
        free()
    return res


# ---------------------------------------------------------------------------- topk_merge


def new_state(n_query: int, k: int, dtype: torch.dtype, dev) -> dict:
    return fresh_state(n_query, k, dtype, torch.device(dev))


def reset_state(state: dict) -> None:
    state["largest_values"].fill_(-math.inf)
    state["smallest_values"].fill_(math.inf)
    state["largest_indices"].fill_(-1)
    state["smallest_indices"].fill_(-1)
    state["status"].zero_()


def check_exact_small(ops, reference, dev) -> dict:
    """Streams of blocks merged by the op against the float64 reference of the whole matrix (exact)."""
    out = {}
    n_query, b, n_blocks = 48, 20000 + 123, 3  # b: a partial last chunk
    for kind in ("random", "integer ties"):
        for k in TOPK_KS:
            g = torch.Generator(device="cpu").manual_seed(k)
            if kind == "random":
                full = torch.randn(n_query, b * n_blocks, generator=g)
            else:
                full = torch.randint(-20, 21, (n_query, b * n_blocks), generator=g).float()
            state = new_state(n_query, k, torch.float32, dev)
            blocks = full.to(dev).split(b, dim=1)
            order = [1, 0, 2]  # out of order: the result must not depend on it
            for j in order:
                ops.topk_merge(blocks[j], j * b, **state)
            index = torch.arange(full.shape[1]).expand_as(full)
            lv, li = reference.select_topk(full.double(), index, k, largest=True)
            sv, si = reference.select_topk(full.double(), index, k, largest=False)
            ok = (torch.equal(state["largest_values"].double().cpu(), lv)
                  and torch.equal(state["largest_indices"].cpu(), li)
                  and torch.equal(state["smallest_values"].double().cpu(), sv)
                  and torch.equal(state["smallest_indices"].cpu(), si)
                  and int(state["status"][0]) == 0)
            out[f"{kind} k={k}"] = bool(ok)
    return out


def check_values(state: dict, blocks: list, k: int) -> bool:
    """The lists hold the k extreme values of the concatenated blocks, and their indices point at them."""
    full = torch.cat(blocks, dim=1)
    ok = True
    for side, largest in (("largest", True), ("smallest", False)):
        ref = torch.topk(full, k, dim=1, largest=largest, sorted=True).values
        ok &= torch.equal(state[f"{side}_values"], ref)
        ok &= torch.equal(full.gather(1, state[f"{side}_indices"]), state[f"{side}_values"])
        idx = state[f"{side}_indices"].sort(dim=1).values
        ok &= bool((idx[:, 1:] != idx[:, :-1]).all())
    del full
    return bool(ok) and int(state["status"][0]) == 0


def merge_step(ops, blocks, b, state, j):
    ops.topk_merge(blocks[j], j * b, **state)


def torch_topk_step(blocks, k, i):
    block = blocks[i % len(blocks)]
    torch.topk(block, k, dim=1)
    torch.topk(block, k, dim=1, largest=False)


def bench_topk(dev, quick: bool, copy_GBps: float | None) -> dict:
    from torchfluence import ops, reference

    res = {"exact_checks": check_exact_small(ops, reference, dev), "runs": []}
    shapes = TOPK_SHAPES[:1] if quick else TOPK_SHAPES
    n_blocks, trials = (4, 2) if quick else (6, 4)
    for n_query, b in shapes:
        blocks = [torch.randn(n_query, b, device=dev) for _ in range(n_blocks)]
        nbytes = n_query * b * 4
        for k in TOPK_KS:
            state = new_state(n_query, k, torch.float32, dev)
            step = functools.partial(merge_step, ops, blocks, b, state)
            fill, st = stream_times(step, state, n_blocks, trials)
            verified = check_values(state, blocks, k)
            step = functools.partial(torch_topk_step, blocks, k)
            torch_t = stats(cuda_times(step, reps=6 if quick else 12))
            GBps = nbytes / st["median_ms"] / 1e6
            res["runs"].append(dict(
                n_query=n_query, b=b, k=k, blocks_per_stream=n_blocks, streams=trials, steady=st,
                fill=fill, bytes_read_per_block=nbytes, read_GBps=GBps,
                fraction_of_copy_rate=GBps / copy_GBps if copy_GBps else None,
                torch_topk_both_ends=torch_t, speedup_vs_torch_topk=torch_t["median_ms"] / st["median_ms"],
                values_verified=verified))
            del state
        del blocks
        free()
    return res


# ---------------------------------------------------------------------------- scoring


def mm_f32_out(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, str]:
    """a @ b with float32 output for 16-bit operands (one GEMM when torch supports out_dtype)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32), "float32 (torch.mm out_dtype)"
    except (TypeError, RuntimeError):
        return torch.mm(a, b), f"{str(a.dtype).replace('torch.', '')} (no out_dtype in this torch)"


def scores_step(S, G, j):
    """One block of scores, (n_query, b), float32 for every operand dtype (widened if torch cannot)."""
    if S.dtype == torch.float32:
        return torch.mm(S, G[j].T)
    return mm_f32_out(S, G[j].T)[0].float()


def gemm_step_rotating(S, G, i):
    scores_step(S, G, i % len(G))


def scores_merge_step(ops, S, G, state, j):
    ops.topk_merge(scores_step(S, G, j), j * G[0].shape[0], **state)


def library_step(top, S, G, j):
    top.update(S, G[j], offset=j * G[0].shape[0])


def fused_step(ops, S, G, state, j):
    ops.influence_block_update(S, G[j], j * G[0].shape[0], state["largest_values"], state["largest_indices"],
                               state["smallest_values"], state["smallest_indices"], state["status"])


def bench_scoring(dev, quick: bool, copy_GBps: float | None) -> dict:
    from torchfluence import ops
    from torchfluence.budget import score_chunk_columns
    from torchfluence.topk import StreamingTopK

    res = {"runs": [], "fused": [], "errors": []}
    ps = SCORING_PS[:2] if quick else SCORING_PS
    trials = 2 if quick else 4
    for p in ps:
        for dtype, ks in ((torch.bfloat16, (10, 100)), (torch.float32, (10,))):
            try:
                scoring_case(res, ops, dev, p, dtype, ks, trials, quick, copy_GBps, StreamingTopK,
                         score_chunk_columns)
            except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
                res["errors"].append(f"p={p} {dtype}: {type(e).__name__}: {e}")
            free()
    return res


def scoring_case(res: dict, ops, dev, p: int, dtype: torch.dtype, ks: tuple, trials: int, quick: bool,
                 copy_GBps: float | None, streaming_topk, chunk_columns) -> None:
    n_q, b = SCORING_NQ, SCORING_B
    elt = torch.empty((), dtype=dtype).element_size()
    n_buf = max(3, min(8, int(8e9 // (b * p * elt))))  # distinct training blocks, <= ~8 GB
    S = (torch.randn(n_q, p, device=dev) / math.sqrt(p)).to(dtype)
    G = [torch.randn(b, p, device=dev).to(dtype) for _ in range(n_buf)]
    flops = 2 * n_q * b * p
    operands = str(dtype).replace("torch.", "")
    scores = "float32 (IEEE)" if dtype == torch.float32 else mm_f32_out(S[:8], G[0][:8].T)[1]
    with float32_matmul(False):
        a = stats(cuda_times(functools.partial(gemm_step_rotating, S, G), reps=6 if quick else 16))
        err = rel_err(scores_step(S, G, 0)[:64, :512], S[:64].double() @ G[0][:512].double().T)
        for k in ks:
            state = new_state(n_q, k, torch.float32, dev)
            step = functools.partial(scores_merge_step, ops, S, G, state)
            _, steady = stream_times(step, state, n_buf, trials)
            floor_ms = n_q * b * 4 / (copy_GBps * 1e6) if copy_GBps else None
            # (c) the library's route: StreamingTopK.update, which scores in L2-sized column chunks.
            top = streaming_topk(n_q, k, device=dev, dtype=dtype)
            _, library = stream_times(functools.partial(library_step, top, S, G), top.state_dict(), n_buf, trials)
            res["runs"].append(dict(
                p=p, n_query=n_q, b=b, k=k, operands=operands, scores=scores, buffers=n_buf,
                gemm=a, gemm_TFLOPs=flops / a["median_ms"] / 1e9, gemm_rel_err=err,
                gemm_merge=steady, gemm_merge_TFLOPs=flops / steady["median_ms"] / 1e9,
                ratio=steady["median_ms"] / a["median_ms"],
                library=library, library_ratio=library["median_ms"] / a["median_ms"],
                chunk_columns=chunk_columns(n_q, torch.device(dev)),
                library_status_clean=int(top.status[0]) == 0,
                ratio_if_merge_at_copy_rate=(1 + floor_ms / a["median_ms"]) if floor_ms else None,
                status_clean=int(state["status"][0]) == 0))
        if p == SCORING_PS[0]:
            res["fused"].append(bench_fused(ops, S, G, max(1, trials // 2)))


def bench_fused(ops, S, G, streams: int) -> dict:
    """The opt-in fused GEMM + top-k kernel (k = 10) on the same blocks; errors are reported, not raised."""
    n_q, b, p = S.shape[0], G[0].shape[0], S.shape[1]
    k, operands = 10, str(S.dtype).replace("torch.", "")
    try:
        state = new_state(n_q, k, torch.float32, S.device)
        _, steady = stream_times(functools.partial(fused_step, ops, S, G, state), state, len(G), streams)
        return dict(p=p, n_query=n_q, b=b, k=k, operands=operands, fused=steady,
                    TFLOPs=2 * n_q * b * p / steady["median_ms"] / 1e9,
                    status_clean=int(state["status"][0]) == 0)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return dict(p=p, operands=operands, error=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------- psg_dot


def psg_step(psg_dot, sets, i):
    psg_dot(*sets[i % len(sets)])


def bench_psg(dev, quick: bool) -> dict:
    res = {"runs": []}
    for name, shape in PSG_SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            try:
                res["runs"].append(bench_psg_one(dev, quick, name, shape, dtype))
            except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
                res["runs"].append(dict(layer=name, dtype=str(dtype).replace("torch.", ""),
                                        error=f"{type(e).__name__}: {e}"))
            free()
    return res


def bench_psg_one(dev, quick: bool, name: str, shape: tuple, dtype: torch.dtype) -> dict:
    from torchfluence import captured_scores as fused, reference

    n_q, n, T, d_in, d_out = shape
    sets = [(torch.randn(n_q, d_out, d_in, device=dev).to(dtype),
             torch.randn(n, T, d_in, device=dev).to(dtype),
             torch.randn(n, T, d_out, device=dev).to(dtype)) for _ in range(2)]
    flops_form = 2 * T * d_in * d_out * n
    flops_contract = 2 * n_q * d_in * d_out * n
    with float32_matmul(False):
        step = functools.partial(psg_step, fused.psg_dot, sets)
        t = stats(cuda_times(step, reps=3 if quick else 8, warmup=1))
        Q, A, D = sets[0]
        out = fused.psg_dot(Q[:32], A[:64], D[:64])
        err = rel_err(out, reference.psg_dot_reference(Q[:32], A[:64], D[:64]))
    return dict(layer=name, n_query=n_q, n=n, T=T, d_in=d_in, d_out=d_out,
                dtype=str(dtype).replace("torch.", ""), time=t, flops=flops_form + flops_contract,
                flops_formation=flops_form, flops_contraction=flops_contract,
                TFLOPs=(flops_form + flops_contract) / t["median_ms"] / 1e9, rel_err=err)


# ---------------------------------------------------------------------------- report


def fmt(v, spec=".3g", missing="-"):
    return missing if v is None else format(v, spec)


def markdown(report: dict) -> str:
    lines = [f"## bench_gpu_kernels ({report['device']}; torch {report['torch']}, CUDA {report['cuda']})", ""]
    ceil = report.get("ceilings")
    if ceil:
        c = ceil["copy"]
        lines += ["| ceiling | ms | rate |", "|---|---|---|",
                  f"| copy {c['bytes_read_plus_written'] / 2 / 2**30:.2g} GiB | {c['median_ms']:.3f} | "
                  f"{c['GBps']:.0f} GB/s (read+write) |"]
        for key, v in ceil.items():
            if key.startswith("gemm"):
                lines.append(f"| {key} {v['n']}^3 | {v['median_ms']:.2f} | {v['TFLOPs']:.1f} TFLOP/s |")
        lines.append("")
    tk = report.get("topk_merge")
    if tk:
        lines += ["topk_merge, float32 blocks; GB/s = score bytes read; % of the copy's (read+write) rate",
                  "| n_q x b | k | steady ms | fill ms | GB/s | % copy | torch.topk x2 ms | values ok |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tk["runs"]:
            frac = r["fraction_of_copy_rate"]
            lines.append(f"| {r['n_query']}x{r['b']} | {r['k']} | {r['steady']['median_ms']:.3f} | "
                         f"{r['fill']['median_ms']:.3f} | {r['read_GBps']:.0f} | "
                         f"{fmt(frac and 100 * frac, '.0f')} | "
                         f"{r['torch_topk_both_ends']['median_ms']:.3f} | {r['values_verified']} |")
        ex = tk["exact_checks"]
        goal = [f"{r['n_query']}x{r['b']} k={r['k']}: "
                f"{'yes' if (r['fraction_of_copy_rate'] or 0) >= 0.8 else 'no'}" for r in tk["runs"]]
        lines += [f"exact against the float64 reference: {'all pass' if all(ex.values()) else ex}",
                  f"goal >= 80% of the copy rate: {'; '.join(goal)}", ""]
    sc = report.get("scoring")
    if sc:
        chunk = sc["runs"][0].get("chunk_columns") if sc["runs"] else None
        lines += [f"scoring, n_q={SCORING_NQ}, b={SCORING_B}: (a) GEMM, (b) GEMM of the block + topk_merge; "
                  f"(c) StreamingTopK.update (GEMM + merge per chunk of {chunk} columns, L2-sized); "
                  "floor = (b)/(a) if the merge read at copy rate",
                  "| p | operands | k | (a) ms | TFLOP/s | (b) ms | (b)/(a) | (c) ms | (c)/(a) | floor | rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sc["runs"]:
            lines.append(f"| {r['p']} | {r['operands']} | {r['k']} | {r['gemm']['median_ms']:.3f} | "
                         f"{r['gemm_TFLOPs']:.0f} | {r['gemm_merge']['median_ms']:.3f} | {r['ratio']:.3f} | "
                         f"{r['library']['median_ms']:.3f} | {r['library_ratio']:.3f} | "
                         f"{fmt(r['ratio_if_merge_at_copy_rate'], '.3f')} | {r['gemm_rel_err']:.1e} |")
        for r in sc["fused"]:
            if "error" in r:
                lines.append(f"fused influence_block_update p={r['p']} {r['operands']}: {r['error'][:160]}")
            else:
                lines.append(f"fused influence_block_update p={r['p']} {r['operands']} k={r['k']}: "
                             f"{r['fused']['median_ms']:.3f} ms, {r['TFLOPs']:.1f} TFLOP/s")
        ratio_goal = [f"p={r['p']} {'yes' if min(r['ratio'], r['library_ratio']) <= 1.15 else 'no'}"
                      for r in sc["runs"]
                      if r["operands"] == "bfloat16" and r["k"] == 10]
        tf_goal = [f"p={r['p']} {'yes' if r['gemm_TFLOPs'] >= 600 else 'no'}" for r in sc["runs"]
                   if r["operands"] == "bfloat16" and r["k"] == 10 and r["p"] >= 4096]
        lines += [f"goals, bf16 k=10: best of (b), (c) <= 1.15 x (a): {', '.join(ratio_goal)}; "
                  f">= 600 TFLOP/s at p >= 4096: {', '.join(tf_goal) or '-'}"]
        lines += [f"ERROR scoring {e[:200]}" for e in sc["errors"]]
        if sc["runs"]:
            lines.append(f"16-bit scores: {sc['runs'][0]['scores']}")
        lines.append("")
    ps = report.get("psg_dot")
    if ps:
        lines += ["psg_dot (formation + contraction flops)", "| layer | dtype | ms | TFLOP/s | rel err |",
                  "|---|---|---|---|---|"]
        for r in ps["runs"]:
            if "error" in r:
                lines.append(f"| {r['layer']} | {r['dtype']} | ERROR {r['error'][:160]} | | |")
                continue
            lines.append(f"| {r['layer']} n={r['n']} n_q={r['n_query']} | {r['dtype']} | "
                         f"{r['time']['median_ms']:.2f} | {r['TFLOPs']:.1f} | {r['rel_err']:.1e} |")
        lines.append("")
    for name, err in report["errors"].items():
        lines.append(f"ERROR in {name}: {err.strip().splitlines()[-1][:200]}")
    if report["failed_checks"]:
        lines.append(f"FAILED checks: {', '.join(report['failed_checks'])}")
    return "\n".join(lines)


def headline(report: dict) -> str:
    parts = []
    ceil = report.get("ceilings") or {}
    if "copy" in ceil:
        parts.append(f"copy {ceil['copy']['GBps']:.0f} GB/s")
    if "gemm bf16" in ceil:
        parts.append(f"bf16 {ceil['gemm bf16']['TFLOPs']:.0f} TF")
    for r in (report.get("topk_merge") or {}).get("runs", [])[:2]:
        frac = r["fraction_of_copy_rate"]
        parts.append(f"merge {r['n_query']}x{r['b']} k{r['k']} {r['read_GBps']:.0f} GB/s"
                     + (f" ({100 * frac:.0f}% copy)" if frac else ""))
    for r in (report.get("scoring") or {}).get("runs", []):
        if r["operands"] == "bfloat16" and r["k"] == 10 and r["p"] in (1024, 4096):
            parts.append(f"score p{r['p']} bf16 {r['gemm_TFLOPs']:.0f} TF ratio {r['ratio']:.2f}"
                         f"/{r['library_ratio']:.2f} chunked")
    if report["errors"] or report["failed_checks"]:
        parts.append(f"{len(report['errors'])} errors, {len(report['failed_checks'])} failed checks")
    return "; ".join(parts)


def failed_checks(report: dict) -> list[str]:
    bad = []
    tk = report.get("topk_merge") or {}
    bad += [f"topk exact {k}" for k, ok in tk.get("exact_checks", {}).items() if not ok]
    bad += [f"topk values {r['n_query']}x{r['b']} k={r['k']}"
            for r in tk.get("runs", []) if not r["values_verified"]]
    bad += [f"scoring error ({e[:80]})" for e in (report.get("scoring") or {}).get("errors", [])]
    for r in (report.get("scoring") or {}).get("runs", []):
        if not r["status_clean"]:
            bad.append(f"scoring p={r['p']} non-finite scores")
        if r["gemm_rel_err"] > (2e-2 if r["operands"] != "float32" else 1e-4):
            bad.append(f"scoring p={r['p']} {r['operands']} rel err {r['gemm_rel_err']:.1e}")
    for r in (report.get("psg_dot") or {}).get("runs", []):
        if "error" in r:
            bad.append(f"psg_dot {r['layer']} {r['dtype']} error")
        elif not r["rel_err"] <= (2e-2 if r["dtype"] != "float32" else 1e-4):
            bad.append(f"psg_dot {r['layer']} {r['dtype']} rel err {r['rel_err']:.1e}")
    return bad


def write(args, report: dict, text: str) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", help="write the tables to this file")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--only", nargs="*", choices=["ceilings", "topk", "scoring", "psg"],
                        help="run only these sections")
    args = parser.parse_args()

    report: dict = dict(torch=torch.__version__, cuda=torch.version.cuda, quick=args.quick, errors={},
                        failed_checks=[])
    if not torch.cuda.is_available():
        msg = f"no CUDA device: nothing measured (torch {torch.__version__}, CUDA build {torch.version.cuda})"
        print(msg)
        report.update(skipped=msg, headline=msg)
        write(args, report, msg)
        return 0
    import torchfluence
    from torchfluence import ops

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    report.update(device=props.name, sms=props.multi_processor_count,
                  l2_mib=getattr(props, "L2_cache_size", 0) / 2**20, memory_gib=props.total_memory / 2**30,
                  build_info=torchfluence.build_info())
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"torchfluence {report['build_info']}", flush=True)
    has_kernels = ops.cuda_available_in_build()
    sections = args.only or ["ceilings", "topk", "scoring", "psg"]
    torch.manual_seed(0)
    t_start = time.perf_counter()
    copy_GBps = None
    for name in sections:
        t0 = time.perf_counter()
        try:
            if name == "ceilings":
                report["ceilings"] = bench_ceilings(dev, args.quick)
                copy_GBps = report["ceilings"]["copy"]["GBps"]
            elif not has_kernels and name in ("topk", "scoring"):
                report["errors"][name] = ("this torchfluence build has no CUDA kernels "
                                          "(build with TORCHFLUENCE_CUDA=ON)")
            elif name == "topk":
                report["topk_merge"] = bench_topk(dev, args.quick, copy_GBps)
            elif name == "scoring":
                report["scoring"] = bench_scoring(dev, args.quick, copy_GBps)
            elif name == "psg":
                report["psg_dot"] = bench_psg(dev, args.quick)
        except Exception:  # noqa: BLE001 - one section's failure must not hide the others
            report["errors"][name] = traceback.format_exc()
            print(report["errors"][name], file=sys.stderr, flush=True)
        free()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    report["seconds"] = time.perf_counter() - t_start
    report["failed_checks"] = failed_checks(report)
    report["headline"] = headline(report)
    text = markdown(report)
    write(args, report, text)
    print(text)
    return 1 if report["errors"] or report["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
