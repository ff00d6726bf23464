"""Dequantize kernel: packed codes and per-token scale codes -> blocks' scaled half-integer codes (U * G, N, C) fp32,
(code - levels / 2 + 0.5) * scale, one pass per (block of tokens, chunk of components, block). What the block
decode's matrix product reads, with each component's step folded into the decoder (`blocks.decode_rows`)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, byte_ptr, shift_ptr, bits_ptr, block_col_ptr, block_bytes_ptr, scale_table_ptr,
    out_ptr,
    N, comps, codes_stride, scales_stride,
    CK: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    block = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    t64 = t.to(tl.int64)
    c = pid_c * CK + tl.arange(0, CK)
    cmask = c < comps
    byte = tl.load(byte_ptr + block * comps + c, mask=cmask, other=0)
    shift = tl.load(shift_ptr + block * comps + c, mask=cmask, other=0)
    bits = tl.load(bits_ptr + block * comps + c, mask=cmask, other=0)
    # A component's code spans its first byte and, where that is not the block's last, the next.
    block_bytes = tl.load(block_bytes_ptr + block)
    src = codes_ptr + t64[:, None] * codes_stride + tl.load(block_col_ptr + block) + byte[None, :]
    coded = tmask[:, None] & (bits > 0)[None, :]
    low = tl.load(src, mask=coded, other=0).to(tl.int32)
    high = tl.load(src + 1, mask=coded & (byte + 1 < block_bytes)[None, :], other=0).to(tl.int32)
    q = ((low | (high << 8)) >> shift[None, :]) & ((1 << bits) - 1)[None, :]
    offset = tl.where(bits > 0, (1 << bits).to(tl.float32) * 0.5 - 0.5, 0.0)
    scode = tl.load(scales_ptr + t64 * scales_stride + block, mask=tmask, other=0).to(tl.int32)
    scaled = (q.to(tl.float32) - offset[None, :]) * tl.load(scale_table_ptr + scode)[:, None]
    dst = out_ptr + (block.to(tl.int64) * N + t64)[:, None] * comps + c[None, :]
    tl.store(dst, scaled, mask=tmask[:, None] & cmask[None, :])
