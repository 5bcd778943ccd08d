"""Peak memory of the streaming jobs: ``top_k`` and ``train_influences(out=...)`` for n_train = N and 10N.

The training data is generated batch by batch from per-batch seeds (an iterable
of (x, y) batches), so it is never in memory; only the result scales with
n_train: the (n_test, n_train) matrix, in a memory-mapped ``.npy`` file for
``out=``, or in memory for the dense baseline. Each case runs in a fresh
subprocess. The model is an MLP on 32 features (K-FAC, fitted on the same data).

Reported per case (from ``/proc/self/status``, sampled every 2 ms by a thread,
plus the kernel's own peak ``VmHWM``): the peak resident set over the process's
state before fitting (after imports, model and test data), and its anonymous
(``RssAnon``: heap, tensors) and file-backed (``RssFile``: mapped files, including
the result file's pages) parts. The file's written pages count in ``RssFile``
until they are flushed and released; :class:`~torchfluence.sinks.MemmapSink`
releases them at every checkpoint save (the ``pages not released`` row turns
that off, to show what it saves). Before the table, each case checks its
result against scores recomputed in memory for two training batches.

    python benchmarks/bench_memory.py [--n 4000] [--n-test 100] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH = 500
FEATURES, HIDDEN, CLASSES = 32, 64, 10


def status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


class PeakSampler(threading.Thread):
    """Samples RssAnon and RssFile every 2 ms; keeps their maxima."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.running = True

    def run(self) -> None:
        while self.running:
            now = status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            time.sleep(0.002)


class SyntheticBatches:
    """n samples in batches of BATCH, each batch generated from its own seed (re-iterable, never stored)."""

    def __init__(self, n: int) -> None:
        import torch

        self.n = n
        self.teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(1))

    def batch(self, index: int):
        import torch

        size = min(BATCH, self.n - index * BATCH)
        x = torch.randn(size, FEATURES, generator=torch.Generator().manual_seed(1000 + index))
        return x, (x @ self.teacher).argmax(dim=1)

    def __iter__(self):
        for index in range((self.n + BATCH - 1) // BATCH):
            yield self.batch(index)


def run_case(case: str, n: int, n_test: int, workdir: Path) -> dict:
    """One case in this process; returns its measurements."""
    import torch
    import torch.nn.functional as F
    import torchfluence as tfl
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).eval()
    data = SyntheticBatches(n)
    xt = torch.randn(n_test, FEATURES, generator=torch.Generator().manual_seed(7))
    yt = (xt @ data.teacher).argmax(dim=1)
    base = status()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    im = tfl.KfacInfluence(model, F.cross_entropy, 1e-3, fisher="empirical", block_size=BATCH).fit(data)
    fitted = time.perf_counter()
    if case == "out_kept":
        # The same job, but the file's pages are only written back (msync), never released:
        # what the resident set would be without MemmapSink.flush's madvise.
        tfl.sinks.MemmapSink.flush = lambda sink: sink._mapping.flush()
    if case == "top_k":
        result = im.top_k(xt, yt, k=10)
    elif case in ("out", "out_kept"):
        result = im.train_influences(xt, yt, out=workdir / "scores.npy")
    else:
        result = im.train_influences(xt, yt)
    end = time.perf_counter()
    sampler.running = False
    sampler.join()
    peak = status()
    check(im, data, xt, yt, case, result)
    return {"case": case, "n": n, "n_test": n_test, "params": im.num_params, "fit_s": fitted - start,
            "score_s": end - fitted, "base": base, "peak": sampler.peak, "VmHWM": peak["VmHWM"],
            "result_mb": n_test * n * 4 / 2**20}


def check(im, data: SyntheticBatches, xt, yt, case: str, result) -> None:
    """The result against scores recomputed in memory for the first and last batch."""
    import torch

    last = (data.n + BATCH - 1) // BATCH - 1
    for index in (0, last):
        x, y = data.batch(index)
        expected = im.influences(xt, yt, x, y)
        columns = slice(index * BATCH, index * BATCH + x.shape[0])
        if case == "top_k":
            # Row 0's best training point beats every score of these batches (or is one of them).
            assert float(result.helpful_values[0, 0]) >= float(expected[0].max()) - 1e-6
            continue
        # The same block computation as in the job: float32 values agree to rounding.
        torch.testing.assert_close(torch.as_tensor(result[:, columns]), expected, rtol=1e-5, atol=1e-6)


def table(rows: list[dict]) -> str:
    mb = 1 / 1024
    lines = ["| case | n_train | n_test x n_train float32 (MiB) | fit (s) | score (s) | "
             "peak RSS - base (MiB) | peak RssAnon - base (MiB) | peak RssFile - base (MiB) | VmHWM (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    names = {"top_k": "`top_k(k=10)`", "out": "`train_influences(out=...)`",
             "out_kept": "`train_influences(out=...)`, pages not released",
             "dense": "`train_influences()` (in memory)"}
    for r in rows:
        b, p = r["base"], r["peak"]
        lines.append(f"| {names[r['case']]} | {r['n']:,} | {r['result_mb']:.1f} | {r['fit_s']:.1f} | "
                     f"{r['score_s']:.1f} | {(p['VmRSS'] - b['VmRSS']) * mb:.1f} | "
                     f"{(p['RssAnon'] - b['RssAnon']) * mb:.1f} | {(p['RssFile'] - b['RssFile']) * mb:.1f} | "
                     f"{r['VmHWM'] * mb:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4_000, help="N: the smaller n_train (the larger is 10N)")
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # a subprocess's case
    args = parser.parse_args()
    if args.case:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(run_case(args.case, args.n, args.n_test, Path(workdir))))
        return
    rows = []
    cases = [(case, n) for case in ("top_k", "out", "dense") for n in (args.n, 10 * args.n)]
    for case, n in cases + [("out_kept", 10 * args.n)]:
        cmd = [sys.executable, __file__, "--case", case, "--n", str(n), "--n-test", str(args.n_test)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if done.returncode != 0:
            raise RuntimeError(f"case {case} n={n} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{case} n={n}: done", file=sys.stderr)
    import torch
    import torchfluence

    header = (f"torch {torch.__version__}, torchfluence {torchfluence.build_info()['version']}, "
              f"{torch.get_num_threads()} threads; MLP {FEATURES}-{HIDDEN}-{CLASSES} "
              f"({rows[0]['params']} parameters), K-FAC, n_test = {args.n_test}, blocks of {BATCH}, float32")
    text = header + "\n\n" + table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
