"""Typed wrappers over the compiled kernels: where tensors are checked before a pointer reaches `_C`.

Python owns every allocation and every check. Before a pointer reaches `_C`,
each op verifies that every argument is a tensor of the expected dtype, exact
shape and device, that the arrays a kernel writes with implied strides are
contiguous, and that the sizes fit the kernels (int64 offsets, CUDA grid
bounds: a call too large for one launch is split, or refused with the limit
named). `_C` repeats every check whose failure would write out of bounds.

Each kernel is a ``torch.library.custom_op`` so it can sit inside
``torch.compile``-d code as an opaque call. The public functions of the same
names check argument *types* first, because the dispatcher would refuse a
non-tensor or an out-of-range int with a RuntimeError that names neither the
op's argument nor what was expected; the op itself checks everything else.

One module per op, named like its kernels (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu):

================  ===============================================================
influence_block   influence_block_update (S @ G.T fused with the top-k merge),
                  check_block_inputs, max_fused_topk
topk_merge        topk_merge (precomputed scores into the running top-k),
                  raise_if_nonfinite
psg_dot           psg_dot_accumulate (captured-layer scores), supports, check_dtype
linear_head       linear_head_hvp_accumulate (closed-form head HVP), supports
sjlt              sjlt_accumulate (sparse JL projection), supports, SJLT_MAX_S/K
_common           dtype tables, argument checks, views for `_C`, stream, launch bounds
================  ===============================================================

Modules outside this package ask an op module what its kernel takes
(``psg_dot.supports(dtype, device)``), never the dtype tables. ``ops.topk_merge``
is the op itself; its module is imported by its full name
(``from torchfluence.ops.topk_merge import ...``).
"""

from __future__ import annotations

from . import influence_block, linear_head, psg_dot, sjlt
from ._common import accumulation_dtype, cuda_available_in_build
from .influence_block import check_block_inputs, influence_block_update, max_fused_topk
from .linear_head import linear_head_hvp_accumulate
from .psg_dot import psg_dot_accumulate
from .sjlt import SJLT_MAX_K, SJLT_MAX_S, sjlt_accumulate
from .topk_merge import raise_if_nonfinite, topk_merge

__all__ = [
    "SJLT_MAX_K",
    "SJLT_MAX_S",
    "accumulation_dtype",
    "check_block_inputs",
    "cuda_available_in_build",
    "influence_block",
    "influence_block_update",
    "linear_head",
    "linear_head_hvp_accumulate",
    "max_fused_topk",
    "psg_dot",
    "psg_dot_accumulate",
    "raise_if_nonfinite",
    "sjlt",
    "sjlt_accumulate",
    "topk_merge",  # the op (the function), which shadows its module's name here
]
