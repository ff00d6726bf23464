"""Quantize kernel: blocks' coefficients (U * G, N, C) fp32 -> per-token scale codes and packed codes, one pass per
(block of tokens, block). The block encode's last step, after its matrix product (`blocks.encode_rows`).

Each output byte is assembled from the few components whose bits land in it (`BlockTables.sources`: their low bits,
or the high bits of one that started in the byte before), gathered from the coefficients the pass has just read, so
a wide block (a joint unit's 960 components) needs no one-hot product as wide as itself."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _quantize_kernel(
    coef_ptr, bits_ptr, step_ptr, peak_ptr, kept_ptr, shift_ptr, sources_ptr, block_col_ptr, block_bytes_ptr,
    scale_table_ptr,
    codes_ptr, scales_ptr,
    N, comps, codes_stride, scales_stride,
    CK: tl.constexpr, BYTES_PAD: tl.constexpr, SLOTS: tl.constexpr, BJ: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    block = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    t64 = t.to(tl.int64)
    coef = coef_ptr + (block.to(tl.int64) * N + t64)[:, None] * comps
    bits_ptr += block * comps
    step_ptr += block * comps
    shift_ptr += block * comps

    # The token's RMS over kept components, raised where it would clip a component of PEAK_BITS or more.
    power = tl.zeros((BLOCK_T,), dtype=tl.float32)
    peak = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in range(0, comps, CK):
        c = k + tl.arange(0, CK)
        cmask = c < comps
        x = tl.load(coef + c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        kept = tl.load(bits_ptr + c, mask=cmask, other=0) > 0
        power += tl.sum(tl.where(kept[None, :], x * x, 0.0), axis=1)
        limit = tl.load(peak_ptr + block * comps + c, mask=cmask, other=0.0)
        peak = tl.maximum(peak, tl.max(tl.abs(x) * limit[None, :], axis=1))
    rms = tl.maximum(tl.math.sqrt_rn(tl.math.div_rn(power, tl.load(kept_ptr + block))), peak)
    scode = tl.floor(tl.log2(tl.maximum(rms, 0.00390625)) * 16.0 + 0.5) + 128.0
    scode = tl.minimum(tl.maximum(scode, 0.0), 255.0).to(tl.int32)
    scale = tl.load(scale_table_ptr + scode)
    tl.store(scales_ptr + t64 * scales_stride + block, scode.to(tl.uint8), mask=tmask)

    # Pack: byte j is the OR of its sources' parts, each (code << shift) & 255 (low) or (code << shift) >> 8 (high).
    block_bytes = tl.load(block_bytes_ptr + block)
    out = codes_ptr + t64[:, None] * codes_stride + tl.load(block_col_ptr + block)
    for j0 in range(0, block_bytes, BJ):
        j = j0 + tl.arange(0, BJ)
        packed = tl.zeros((BLOCK_T, BJ), dtype=tl.int32)
        for slot in tl.static_range(SLOTS):
            source = tl.load(sources_ptr + (block * BYTES_PAD + j) * SLOTS + slot)
            found = source >= 0
            comp = tl.where(found, source >> 1, 0)
            x = tl.load(coef + comp[None, :], mask=tmask[:, None] & found[None, :], other=0.0)
            bits = tl.load(bits_ptr + comp)
            step = tl.where(found, tl.load(step_ptr + comp), 1.0)[None, :] * scale[:, None]
            levels = (1 << bits).to(tl.float32)[None, :]
            q = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x, step)) + levels * 0.5, 0.0), levels - 1.0)
            shifted = q.to(tl.int32) << tl.load(shift_ptr + comp)[None, :]
            part = tl.where((source & 1)[None, :] == 1, shifted >> 8, shifted & 255)
            packed = packed | tl.where(found[None, :], part, 0)
        tl.store(out + j[None, :], packed.to(tl.uint8), mask=tmask[:, None] & (j < block_bytes)[None, :])
