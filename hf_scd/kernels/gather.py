"""Gather kernel: the coded tokens of a Reuse unit's member layers -> de-rotated (keys) and centred block-major
vectors (U * G, N, W) in fp32, one pass per (block of tokens, head, layer) and one launch for every layer of a
cache. What the block encode's matrix product reads (`blocks.encode_rows`)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._rotary import load_rotary
from ._rows import program_rows


@triton.jit
def _gather_kernel(
    x_ptr, x_off_ptr, rows_ptr, cos_ptr, sin_ptr, mean_ptr, block_ptr, col_ptr,
    out_ptr,
    N, W, seq, H,
    sxb, sxh, sxs, scr, ssr,
    ROTARY: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    t, tmask, row, b, s = program_rows(rows_ptr, N, seq, BLOCK_T)
    h = tl.program_id(1)
    layer = tl.program_id(2)
    lh = layer * H + h
    src = x_ptr + tl.multiple_of(tl.load(x_off_ptr + layer), ALIGN) + (b * sxb + h * sxh + s * sxs)[:, None]
    # This head of this layer is columns col .. col + D of block `block` (a joint unit's one block, or its own).
    block = tl.load(block_ptr + lh).to(tl.int64)
    col = tl.multiple_of(tl.load(col_ptr + lh), 16)
    dst = out_ptr + (block * N + t.to(tl.int64))[:, None] * W + col
    mean_ptr += block * W + col
    if ROTARY:
        # remove_rotary as the reference computes it: x * cos / r + swap_halves(x) * (sin | -sin) / r, r = cos^2 +
        # sin^2 (an attention scaling divided out).
        lo = tl.arange(0, D // 2)
        hi = lo + D // 2
        x_lo = tl.load(src + lo[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        x_hi = tl.load(src + hi[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        c_lo, c_hi, s_lo, s_hi = load_rotary(cos_ptr, sin_ptr, row, scr, ssr, lo, hi, tmask)
        r_lo = c_lo * c_lo + s_lo * s_lo
        r_hi = c_hi * c_hi + s_hi * s_hi
        content_lo = x_lo * tl.math.div_rn(c_lo, r_lo) + x_hi * tl.math.div_rn(s_lo, r_lo)
        content_hi = x_hi * tl.math.div_rn(c_hi, r_hi) - x_lo * tl.math.div_rn(s_hi, r_hi)
        tl.store(dst + lo[None, :], content_lo - tl.load(mean_ptr + lo)[None, :], mask=tmask[:, None])
        tl.store(dst + hi[None, :], content_hi - tl.load(mean_ptr + hi)[None, :], mask=tmask[:, None])
    else:
        d = tl.arange(0, D)
        x = tl.load(src + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        tl.store(dst + d[None, :], x - tl.load(mean_ptr + d)[None, :], mask=tmask[:, None])
