"""Scatter kernel: decoded block-major vectors (U * G, N, W) fp32 -> re-rotated (keys) rows of each member layer's
output cache (batch, H, seq, d), in its dtype, one pass per (block of tokens, head, layer) and one launch for every
layer of a cache. What follows the block decode's matrix product (`blocks.decode_rows`)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._rotary import load_rotary
from ._rows import program_rows


@triton.jit
def _scatter_kernel(
    y_ptr, rows_ptr, cos_ptr, sin_ptr, block_ptr, col_ptr,
    out_ptr, out_off_ptr,
    N, W, seq, H,
    sob, soh, sos, scr, ssr,
    ROTARY: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    t, tmask, row, b, s = program_rows(rows_ptr, N, seq, BLOCK_T)
    h = tl.program_id(1)
    layer = tl.program_id(2)
    lh = layer * H + h
    block = tl.load(block_ptr + lh).to(tl.int64)
    src = y_ptr + (block * N + t.to(tl.int64))[:, None] * W + tl.multiple_of(tl.load(col_ptr + lh), 16)
    out_layer = out_ptr + tl.multiple_of(tl.load(out_off_ptr + layer), ALIGN)
    dst = out_layer + (b * sob + h * soh + s * sos)[:, None]
    if ROTARY:
        # apply_rotary: x * cos + swap_halves(x) * (-sin | sin), rounded to the output dtype once.
        lo = tl.arange(0, D // 2)
        hi = lo + D // 2
        x_lo = tl.load(src + lo[None, :], mask=tmask[:, None], other=0.0)
        x_hi = tl.load(src + hi[None, :], mask=tmask[:, None], other=0.0)
        c_lo, c_hi, s_lo, s_hi = load_rotary(cos_ptr, sin_ptr, row, scr, ssr, lo, hi, tmask)
        tl.store(dst + lo[None, :], (x_lo * c_lo - x_hi * s_lo).to(out_ptr.dtype.element_ty), mask=tmask[:, None])
        tl.store(dst + hi[None, :], (x_hi * c_hi + x_lo * s_hi).to(out_ptr.dtype.element_ty), mask=tmask[:, None])
    else:
        d = tl.arange(0, D)
        x = tl.load(src + d[None, :], mask=tmask[:, None], other=0.0)
        tl.store(dst + d[None, :], x.to(out_ptr.dtype.element_ty), mask=tmask[:, None])
