"""torchfluence.ptif against the original pytorch-influence-functions, same config, same model, one run.

The digits CNN (1437 train, 360 test) trained for 300 Adam steps. Both run
``calc_img_wise`` with the same config (damp 0.01, scale 25, the given recursion
depth, batch size 32 for the recursion). The original needs a GPU as released
(``calc_img_wise`` hard-codes ``gpu=0``); here its ``calc_influence_single`` is
wrapped to pass ``gpu=-1``, and nothing else is changed. Reported: time per test
point, and the Pearson / Spearman correlation of its influences with the exact
ones, ``-(1/n) grad L(z_test)^T (H + damp I)^-1 grad L(z_j)`` (float64 Hessian,
dense solve). Speed-ups are against the original at the same recursion depth
(CG and direct: against the last depth). The speed-up speaks of the time per test
point, so it grows with the number of test points solved together.

    python benchmarks/bench_ptif.py [--depths 100 1000] [--original-tests 10] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

sys.path.insert(0, str(Path(__file__).parent))
import torchfluence.ptif as ptif  # noqa: E402
from _timing import environment, print_table  # noqa: E402
from bench_approx import pearson, rank_of  # noqa: E402
from bench_solvers import digits_data, exact_matrix, trained  # noqa: E402

try:
    import pytorch_influence_functions as original
    from pytorch_influence_functions import calc_influence_function as original_calc
except ImportError:  # optional peer
    original = None

DAMP, SCALE, BATCH = 0.01, 25.0, 32


class IntLabels(Dataset):
    """(image, int label) pairs: the original writes labels to JSON and cannot serialise tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def correlations(rows: torch.Tensor, exact: torch.Tensor) -> list[str]:
    rows, exact = rows.double().flatten(), exact.double().flatten()
    return [f"{pearson(rows, exact):.3f}", f"{pearson(rank_of(rows), rank_of(exact)):.3f}"]


def run_original(model, train, test, depth: int, n_tests: int, outdir: Path):
    """Seconds per test point, the test indices it chose, and its (n_tests, n_train) influences."""
    inner = original_calc.calc_influence_single

    def on_cpu(*args, **kwargs):  # the only change: calc_img_wise passes gpu=0 unconditionally
        kwargs["gpu"] = -1
        return inner(*args, **kwargs)

    original_calc.calc_influence_single = on_cpu
    outdir.mkdir(parents=True)  # the original writes into outdir without creating it
    try:
        config = {**original.get_default_config(), "outdir": str(outdir), "gpu": -1, "num_classes": 10,
                  "test_sample_num": n_tests // 10, "test_start_index": 0, "recursion_depth": depth,
                  "r_averaging": 1, "damp": DAMP, "scale": SCALE}
        original.calc_img_wise(config, model, DataLoader(train, batch_size=BATCH, shuffle=True),
                               DataLoader(test, batch_size=BATCH))
    finally:
        original_calc.calc_influence_single = inner
    results = json.loads((outdir / f"influence_results_0_{n_tests // 10}.json").read_text())
    seconds = sum(r["time_calc_influence_s"] for r in results.values()) / len(results)
    indices = [int(k) for k in results]
    return seconds, indices, torch.tensor([results[str(i)]["influence"] for i in indices])


def run_ours(model, train, test, indices: list[int], solver: str, depth: int, outdir: Path):
    config = {**ptif.get_default_config(), "outdir": str(outdir), "solver": solver, "damp": DAMP, "scale": SCALE,
              "recursion_depth": depth, "test_sample_num": False}
    began = time.perf_counter()
    results, _, _ = ptif.calc_img_wise(config, model, DataLoader(train, batch_size=BATCH, shuffle=True),
                                       DataLoader(Subset(test, indices), batch_size=BATCH))
    seconds = (time.perf_counter() - began) / len(indices)
    return seconds, torch.tensor([r["influence"] for r in results.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[100, 1000], help="recursion_depth values")
    parser.add_argument("--original-tests", type=int, default=10, help="test points for the original (x10)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Implicit dimension choice")  # the original's log_softmax

    x, y, xt, yt = digits_data(image=True)
    model = trained("cnn", x, y)
    train, test = IntLabels(x, y), IntLabels(xt, yt)
    exact_all, _ = exact_matrix(model, x, y, xt, yt, reg=DAMP)
    exact = -exact_all / len(x)
    few, many = list(range(args.original_tests)), list(range(len(xt)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def ours(solver, chosen, depth, baseline):
            seconds, got = run_ours(model, train, test, chosen, solver, depth, tmp / f"{solver}{len(chosen)}-{depth}")
            speedup = f"{baseline / seconds:.0f}x" if baseline else "-"
            rows.append(["torchfluence.ptif", solver, str(depth) if solver == "lissa" else "-", str(len(chosen)),
                         f"{seconds:.4f}", speedup, *correlations(got, exact[chosen])])
            print(" | ".join(rows[-1]), flush=True)

        baseline = None
        for depth in args.depths:
            if original is None:
                print("pytorch-influence-functions is not installed: only torchfluence runs")
            else:
                baseline, few, original_rows = run_original(model, train, test, depth, args.original_tests,
                                                            tmp / f"original-{depth}")
                rows.append(["pytorch-influence-functions 0.1.1", "lissa (as released)", str(depth), str(len(few)),
                             f"{baseline:.3f}", "1x", *correlations(original_rows, exact[few])])
                print(" | ".join(rows[-1]), flush=True)
            ours("lissa", few, depth, baseline)
            ours("lissa", many, depth, baseline)
        for solver in ("cg", "direct"):
            ours(solver, few, args.depths[-1], baseline)  # the depth is only recorded in the config
            ours(solver, many, args.depths[-1], baseline)
    env = environment(torch.device("cpu"))
    print(env)
    setting = f"digits CNN, {len(x)} train; damp {DAMP}, scale {SCALE}, recursion batch {BATCH}"
    print(setting)
    text = print_table(["implementation", "solver", "recursion_depth", "test points", "s per test point",
                        "speed-up", "Pearson vs exact", "Spearman vs exact"], rows)
    if args.markdown:
        Path(args.markdown).write_text(f"{env}\n\n{setting}\n\n{text}\n")


if __name__ == "__main__":
    main()
