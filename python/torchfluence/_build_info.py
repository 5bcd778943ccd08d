"""What the compiled extension contains."""

from __future__ import annotations

from typing import Any

from ._native import _C


def build_info() -> dict[str, Any]:
    """Describes the compiled extension.

    Returns:
        A dict with ``version`` (package version), ``openmp_threads`` (threads the
        CPU kernels use), ``cuda`` (whether CUDA kernels were compiled),
        ``cuda_version`` (CUDA runtime version they were built with, or None),
        ``cuda_architectures`` (e.g. ``"80-real,90-real,90-virtual"``, or None) and
        ``max_fused_topk`` (largest k the CUDA top-k epilogue keeps on chip).
    """
    return dict(_C.build_info())
