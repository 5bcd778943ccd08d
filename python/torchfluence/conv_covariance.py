"""The covariance of a convolution's patches, ``sum_{n,t} a_nt a_nt^T``, without forming the patches.

For a 2-d convolution with stride 1 the patch at output row h and kernel row i
reads input row ``h + i dh``. With the kw column shifts of the padded input laid
side by side, C[n, r, w, (c, j)] = x[n, c, r, w + j dw], a patch is kh rows of C,
and the block of the covariance between kernel rows i and i' is

    sum_n sum_{h < out_h} C[n, h + i dh]^T C[n, h + i' dh]          (c kw x c kw)

which depends on (i, i') mostly through the shift delta = (i' - i) dh. One GEMM
per shift over all rows of all samples (C flattened to (n * rows * out_w, c kw))
gives the sum over every row pair at that shift; each block then subtracts the
few rows outside its window, and the pairs that the flattening joined across
consecutive samples. That is kh GEMMs over the input instead of one over patches
kh times larger: about kh / 2 times fewer multiply-adds (3x less for kh = 3, plus
the boundary rows, 2(kh - 1) / rows of the main work), and no patch tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Fewest output rows at which the shift route is taken: its boundary rows cost
# 2 (kh - 1) / out_h of the main work, so at 4 x 4 outputs it saves nothing.
MIN_OUTPUT_ROWS = 8


def applies(module: nn.Conv2d, x: Tensor, pads: list[int]) -> bool:
    """Whether :func:`patch_covariance` handles this convolution and input (a shape rule)."""
    kh = module.kernel_size[0]
    out_h = x.shape[2] + pads[2] + pads[3] - module.dilation[0] * (kh - 1)
    return tuple(module.stride) == (1, 1) and module.groups == 1 and kh > 1 and out_h >= MIN_OUTPUT_ROWS


def patch_covariance(module: nn.Conv2d, x: Tensor, pads: list[int], bias: bool) -> Tensor:
    """``sum_{n,t} a_nt a_nt^T`` over the patches a of `module` on `x`, (d_in_total, d_in_total).

    Args:
        module: a 2-d convolution with stride 1 and groups 1 (see :func:`applies`).
        x: (n, c, h, w) its input; pads: its zero padding as ``F.pad``'s [left, right, top, bottom].
        bias: append the constant-1 column of the bias (last row and column).

    Returns the covariance in the input's dtype, indexed like the weight's flattened (c, kh, kw).
    """
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    if any(pads):
        x = F.pad(x, pads)
    n, c, rows, width = x.shape
    out_h, out_w = rows - dh * (kh - 1), width - dw * (kw - 1)
    m = c * kw
    # C (n, rows, out_w, c, kw): the kw column shifts, one copy of 1/kh of the patches' size.
    shifted = x.new_empty(n, rows, out_w, c, kw)
    for j in range(kw):
        shifted[..., j] = x[:, :, :, j * dw:j * dw + out_w].permute(0, 2, 3, 1)
    flat = shifted.view(n * rows * out_w, m)
    by_row = shifted.view(n, rows, out_w, m)

    def row_sum(r: int, r_next: int, across: bool) -> Tensor:
        """sum_n C[n, r]^T C[n (+1 if across), r_next], (m, m)."""
        left = by_row[:-1, r] if across else by_row[:, r]
        right = by_row[1:, r_next] if across else by_row[:, r_next]
        return left.reshape(-1, m).T @ right.reshape(-1, m)

    blocks = x.new_empty(kh, kh, m, m)
    for shift_rows in range(kh):
        delta = shift_rows * dh
        total = flat[:flat.shape[0] - delta * out_w].T @ flat[delta * out_w:]
        # Pairs joined across samples by the flattening: rows rows-delta.. of sample n with rows ..delta of n + 1.
        for r in range(rows - delta, rows):
            total -= row_sum(r, r + delta - rows, across=True)
        for i in range(kh - shift_rows):
            block = total.clone()
            for r in [*range(0, i * dh), *range(i * dh + out_h, rows - delta)]:  # rows outside the window
                block -= row_sum(r, r + delta, across=False)
            blocks[i, i + shift_rows] = block
            if shift_rows:
                blocks[i + shift_rows, i] = block.T
    # (kh, kh, c, kw, c, kw) -> (c, kh, kw) x (c, kh, kw), the weight's order.
    cov = blocks.view(kh, kh, c, kw, c, kw).permute(2, 0, 3, 4, 1, 5).reshape(c * kh * kw, c * kh * kw)
    if not bias:
        return cov
    sums = by_row.sum(dim=(0, 2))  # (rows, m): per input row, summed over samples and columns
    column = torch.stack([sums[i * dh:i * dh + out_h].sum(dim=0) for i in range(kh)])  # (kh, m)
    column = column.view(kh, c, kw).permute(1, 0, 2).reshape(-1)
    out = cov.new_empty(cov.shape[0] + 1, cov.shape[0] + 1)
    out[:-1, :-1] = cov
    out[:-1, -1] = column
    out[-1, :-1] = column
    out[-1, -1] = n * out_h * out_w
    return out
