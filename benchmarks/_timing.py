"""Timing helpers shared by the benchmarks: warm-up, repeats, median."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch
import torchfluence


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` (CUDA events on GPU, after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment(device: torch.device) -> str:
    info = torchfluence.build_info()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    return f"device: {where}; torch {torch.__version__}{cuda}; torchfluence {info['version']} (cuda build: {info['cuda']})"


def print_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    text = "\n".join([line, sep, *body])
    print(text)
    return text
