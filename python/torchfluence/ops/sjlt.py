"""sjlt_accumulate: the sparse Johnson-Lindenstrauss projection of a block of columns (csrc/*/sjlt.*)."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from .._native import _C
from . import _common

# Limits of the kernels (csrc/sjlt_args.h): s bounds the CUDA kernel's shared codes, k the int32 bucket codes.
SJLT_MAX_S = 64
SJLT_MAX_K = 2**30


def supports(dtype: torch.dtype, device: Union[torch.device, str]) -> bool:
    """Whether the kernel reads G of `dtype` on `device` as it is (into the accumulation dtype's `out`).

    float32 and float64 on the CPU; also float16 and bfloat16 on CUDA (accumulated in float32).
    """
    return _common.kernels_read(dtype, device)


def _check(G, offset, s, seed, out) -> None:
    op = "sjlt_accumulate"
    _common.check_input(op, "G", G, 2, "(n, p_block)")
    _common.check_backend(op, G.device)
    n, acc = G.shape[0], _common.accumulation_dtype(G.dtype)
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise (TypeError if not isinstance(out, Tensor) else ValueError)(
            f"{op}: out must be a (n, k) = ({n}, k) {acc} tensor on {G.device}, got {_common.got(out)}"
        )
    k = out.shape[1]
    if not 1 <= k <= SJLT_MAX_K:
        raise ValueError(
            f"{op}: out must have 1 <= k <= {SJLT_MAX_K} columns, got {_common.shape_str(out.shape)}"
        )
    _common.check_output(op, "out", out, (n, k), acc, G.device)
    s = _common.as_int(op, "s", s)
    if not isinstance(s, torch.SymInt) and not 1 <= s <= min(k, SJLT_MAX_S):
        raise ValueError(f"{op}: s must be in [1, min(k, {SJLT_MAX_S})] = [1, {min(k, SJLT_MAX_S)}], got {s}")
    seed = _common.as_int(op, "seed", seed)
    if not isinstance(seed, torch.SymInt) and not 0 <= seed <= _common.INT64_MAX:
        raise ValueError(f"{op}: seed must be in [0, 2**63 - 1], got {seed}")
    offset = _common.as_int(op, "offset", offset)
    if not isinstance(offset, torch.SymInt) and offset > _common.INT64_MAX - G.shape[1]:
        raise ValueError(
            f"{op}: offset + p_block must fit in int64 (global column indices), got offset {offset} with "
            f"p_block = {G.shape[1]}"
        )
    _common.check_offset(op, offset, G.shape[1])


@torch.library.custom_op("torchfluence::sjlt_accumulate", mutates_args=("out",))
def _sjlt_accumulate(G: Tensor, offset: int, s: int, seed: int, out: Tensor) -> None:
    _check(G, offset, s, seed, out)
    if G.shape[0] == 0 or G.shape[1] == 0:
        return
    code = _common.DTYPE_CODES[G.dtype]
    args = _C.SjltArgs(code, _common.matrix_ref(G), offset, s, seed, _common.matrix_ref(out))
    if G.device.type == "cpu":
        _C.sjlt_cpu(args)
        return
    with torch.cuda.device(G.device):
        _C.sjlt_cuda(args, _common.stream(G.device))


@_sjlt_accumulate.register_fake
def _(G, offset, s, seed, out):
    # Accumulates into `out` in place; nothing to describe for tracing. The fake
    # lets torch.compile trace through and runs the eager checks.
    _check(G, offset, s, seed, out)
    return None


def sjlt_accumulate(G: Tensor, out: Tensor, s: int, seed: int, offset: int = 0) -> None:
    """out += G @ P[:, offset : offset + p_block].T for the sparse JL matrix P (k, p) of (seed, s, k).

    P has s non-zeros +-1/sqrt(s) per column, one in each of s row blocks, from a
    counter-based hash of (seed, global column, block); it is never stored (see
    csrc/sjlt.h and :func:`torchfluence.reference.sjlt_codes_reference`). Every
    output is accumulated in ascending column order from its value in `out`, so the
    CPU and CUDA kernels give the same bits, two calls on consecutive column blocks
    give the same bits as one call on both, and no result depends on thread counts.

    Args:
        G: (n, p_block) rows to project, global columns offset .. offset + p_block - 1;
            float32/float64 (CPU), also float16/bfloat16 (CUDA); any strides.
        out: (n, k) accumulated into, in the accumulation dtype of G (float64 for float64,
            float32 otherwise), G's device, any non-overlapping strides; 1 <= k <= 2**30.
        s: non-zeros per column, 1 <= s <= min(k, 64).
        seed: in [0, 2**63 - 1].
        offset: global index of G's column 0; >= 0 and offset + p_block < 2**63.

    Raises:
        TypeError, ValueError: naming the argument, the expected and the actual value.
    """
    op = "sjlt_accumulate"
    _common.require_tensors(op, G=G, out=out)
    ints = {}
    for name, value in (("s", s), ("seed", seed), ("offset", offset)):
        # In int64 range for the dispatcher; the op checks the meaningful range and names it.
        ints[name] = value = _common.as_int(op, name, value)
        if not isinstance(value, torch.SymInt) and not -_common.INT64_MAX - 1 <= value <= _common.INT64_MAX:
            raise ValueError(f"{op}: {name} must fit in int64, got {value}")
    _sjlt_accumulate(G, ints["offset"], ints["s"], ints["seed"], out)
