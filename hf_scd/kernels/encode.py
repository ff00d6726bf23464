"""Fused encode kernel: gather rows -> de-rotate keys -> centre -> encoder product (bf16 pieces) -> RMS and peak ->
scale code -> quantize -> pack (8-bit one-hot products), in one pass per (block of tokens, head, layer). Only the packed
codes and scale codes reach global memory, and one launch codes every layer of a cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from hf_scd.codes import CoderPair, RowCodes, TransformCode

from ._bf16 import MMA_DTYPE, round_bf16
from ._launch import KernelLaunch, autotuned, cache_tables, layer_pointers, single_layers, unit_stride
from ._rotary import load_rotary
from ._rows import program_rows
from ._tables import BYTE_CHUNK


@triton.jit
def _project(unit, x, enc_ptr, piece_stride, d, c, C: tl.constexpr, X_EXACT: tl.constexpr):
    """unit += x @ encoder[d, :] for the input columns d of x: the encoder's two bf16 pieces times x, itself split in
    two unless it is bf16 already (hi.hi + hi.mid + lo.hi: about 2^-16 of the terms)."""
    w = enc_ptr + d[:, None] * C + c[None, :]
    e_hi = tl.load(w).to(MMA_DTYPE)
    e_mid = tl.load(w + piece_stride).to(MMA_DTYPE)
    if X_EXACT:
        x_hi = x.to(MMA_DTYPE)
    else:
        x_hi = round_bf16(x)
        unit = tl.dot(round_bf16(x - x_hi).to(MMA_DTYPE), e_hi, unit)
        x_hi = x_hi.to(MMA_DTYPE)
    unit = tl.dot(x_hi, e_mid, unit)
    return tl.dot(x_hi, e_hi, unit)


@triton.jit
def _encode_kernel(
    x_ptr, x_off_ptr, cos_ptr, sin_ptr, rows_ptr,
    mean_ptr, mean_code_ptr, enc_ptr, enc_piece_stride, byte_ptr, byte_count_ptr, shift_ptr, bits_ptr, step_ptr,
    head_col_ptr, head_bytes_ptr, kept_ptr, scale_table_ptr, peak_ptr,
    codes_ptr, scales_ptr,
    N, seq, H, codes_stride, scales_stride,
    sxb, sxh, sxs, scr, ssr,
    ROTARY: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BYTES_PAD: tl.constexpr,
    BJ: tl.constexpr, X_EXACT: tl.constexpr, X_ALIGN: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    t, tmask, row, b, s = program_rows(rows_ptr, N, seq, BLOCK_T)
    h = tl.program_id(1)
    layer = tl.program_id(2)
    lh = layer * H + h
    x_layer = x_ptr + tl.multiple_of(tl.load(x_off_ptr + layer), X_ALIGN)
    src = x_layer + (b * sxb + h * sxh + s * sxs)[:, None]
    c = tl.arange(0, C)
    mean_ptr += lh * D
    enc_ptr += lh * D * C

    # unit = (content - mean) @ encoder[layer, h], accumulated over chunks of BK input columns.
    if ROTARY:
        # remove_rotary: (x*cos - rotate_half(x)*sin) / (cos^2 + sin^2), where rotate_half(x) = (-x_hi, x_lo): the
        # two halves of each chunk are loaded once each and de-rotated against each other.
        unit = tl.zeros((BLOCK_T, C), dtype=tl.float32)
        for k in tl.static_range(0, D // 2, BK):
            lo = k + tl.arange(0, BK)
            hi = lo + D // 2
            x_lo = tl.load(src + lo[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(src + hi[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
            c_lo, c_hi, s_lo, s_hi = load_rotary(cos_ptr, sin_ptr, row, scr, ssr, lo, hi, tmask)
            content_lo = tl.math.div_rn(x_lo * c_lo + x_hi * s_lo, c_lo * c_lo + s_lo * s_lo)
            content_hi = tl.math.div_rn(x_hi * c_hi - x_lo * s_hi, c_hi * c_hi + s_hi * s_hi)
            content_lo -= tl.load(mean_ptr + lo)[None, :]
            content_hi -= tl.load(mean_ptr + hi)[None, :]
            unit = _project(unit, content_lo, enc_ptr, enc_piece_stride, lo, c, C, False)
            unit = _project(unit, content_hi, enc_ptr, enc_piece_stride, hi, c, C, False)
    else:
        # A bf16 row is projected as it is, exactly, and mean @ encoder taken off after; others are centred first.
        if X_EXACT:
            unit = tl.zeros((BLOCK_T, C), dtype=tl.float32) - tl.load(mean_code_ptr + lh * C + c)[None, :]
        else:
            unit = tl.zeros((BLOCK_T, C), dtype=tl.float32)
        for k in tl.static_range(0, D, BK):
            d = k + tl.arange(0, BK)
            x = tl.load(src + d[None, :], mask=tmask[:, None], other=0.0)
            if not X_EXACT:
                x = x.to(tl.float32) - tl.load(mean_ptr + d)[None, :]
            unit = _project(unit, x, enc_ptr, enc_piece_stride, d, c, C, X_EXACT)

    # Per token-head RMS over kept components (or the peak) -> log scale code -> per-component step.
    bits = tl.load(bits_ptr + lh * C + c)
    kept = (bits > 0)[None, :]
    power = tl.sum(tl.where(kept, unit * unit, 0.0), axis=1)
    rms = tl.math.sqrt_rn(tl.math.div_rn(power, tl.load(kept_ptr + lh)))
    # Raised where the RMS would clip a component of PEAK_BITS or more (its limit is 0 elsewhere).
    rms = tl.maximum(rms, tl.max(tl.abs(unit) * tl.load(peak_ptr + lh * C + c)[None, :], axis=1))
    scode = tl.floor(tl.log2(tl.maximum(rms, 0.00390625)) * 16.0 + 0.5) + 128.0
    scode = tl.minimum(tl.maximum(scode, 0.0), 255.0).to(tl.int32)
    scale = tl.load(scale_table_ptr + scode)
    step = tl.load(step_ptr + lh * C + c)[None, :] * scale[:, None]
    levels = (1 << bits).to(tl.float32)[None, :]
    ratio = tl.math.div_rn(unit, tl.where(kept, step, 1.0))
    q = tl.minimum(tl.maximum(tl.floor(ratio) + levels * 0.5, 0.0), levels - 1.0)
    q = tl.where(kept, q, 0.0).to(tl.int32)

    # Pack: component c adds (q << shift) & 255 to byte byte_c and (q << shift) >> 8 (< 128) to byte_c + 1. Bits of
    # different components are disjoint, so per-byte sums are ORs: 8-bit integer products with one-hot matrices,
    # the low bytes offset by -128 to fit int8 and the offset added back per byte (byte_count components each).
    shifted = q << tl.load(shift_ptr + lh * C + c)[None, :]
    lo_bytes = ((shifted & 255) - 128).to(tl.int8)
    hi_bytes = (shifted >> 8).to(tl.int8)
    byte = tl.load(byte_ptr + lh * C + c)
    head_bytes = tl.load(head_bytes_ptr + lh)
    out = codes_ptr + t.to(tl.int64)[:, None] * codes_stride + tl.load(head_col_ptr + lh)
    for j0 in tl.static_range(0, BYTES_PAD, BJ):
        j = j0 + tl.arange(0, BJ)
        offset = 128 * tl.load(byte_count_ptr + lh * BYTES_PAD + j)
        if j0 < head_bytes:  # chunks are padded to the launch's longest head: a shorter one stops at its own end
            packed = offset[None, :] + tl.zeros((BLOCK_T, BJ), tl.int32)
            packed = tl.dot(lo_bytes, (byte[:, None] == j[None, :]).to(tl.int8), packed)
            packed = tl.dot(hi_bytes, (byte[:, None] + 1 == j[None, :]).to(tl.int8), packed)
            tl.store(out + j[None, :], packed.to(tl.uint8), mask=tmask[:, None] & (j[None, :] < head_bytes))
    tl.store(scales_ptr + t.to(tl.int64) * scales_stride + lh, scode.to(tl.uint8), mask=tmask)


_encode_tuned = autotuned(_encode_kernel, key=["D", "C", "ROTARY", "BYTES_PAD"])


def encode_launches(
    xs: Sequence[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    codes: Sequence[TransformCode],
    rotary: bool,
) -> tuple[list[KernelLaunch], list[torch.Tensor], list[torch.Tensor]]:
    """The launches coding tokens `rows` of every layer's cache tensor of one kind (batch, H, seq, d), and per layer
    the packed codes (N, bytes) and scale codes (N, H) they fill.

    One launch for all layers, whose outputs are views of one (N, all layers' bytes) and one (N, L, H) tensor; one
    a layer where the layers' tensors differ in strides or dtype; none for no rows.
    """
    if not xs:
        return [], [], []
    xs = [unit_stride(x) for x in xs]
    pointers = layer_pointers(xs)
    if pointers is None:
        apart = [encode_launches([x], cos, sin, rows, [code], rotary) for x, code in zip(xs, codes, strict=True)]
        return (
            [run for part in apart for run in part[0]],
            [part[1][0] for part in apart],
            [part[2][0] for part in apart],
        )
    tab, (batch, heads, seq, dim), rows = cache_tables(xs, codes, rows)
    device = rows.device
    cos, sin = unit_stride(cos), unit_stride(sin)
    n = rows.numel()
    packed = torch.empty(n, sum(tab.layer_bytes), dtype=torch.uint8, device=device)
    scales = torch.empty(n, tab.layers, heads, dtype=torch.uint8, device=device)
    outputs = list(packed.split(tab.layer_bytes, 1)), list(scales.unbind(1))
    if n == 0 or heads == 0:
        return [], *outputs
    args = (
        pointers.base, pointers.offsets, cos, sin, rows,
        tab.mean, tab.mean_code, tab.encoder, tab.encoder.stride(0),
        tab.byte_rel, tab.byte_count, tab.shift, tab.bits, tab.step,
        tab.head_col, tab.head_bytes, tab.kept, tab.scale_table, tab.peak,
        packed, scales,
        n, seq, heads, packed.stride(0), scales.stride(0),
        *pointers.base.stride()[:3], cos.stride(0), sin.stride(0),
    )  # fmt: skip
    meta = dict(
        ROTARY=rotary, D=dim, C=tab.comps, BK=min(dim // 2 if rotary else dim, 64), BYTES_PAD=tab.bytes_pad,
        BJ=BYTE_CHUNK, X_EXACT=not rotary and pointers.base.dtype == torch.bfloat16, X_ALIGN=pointers.align,
    )  # fmt: skip
    return [KernelLaunch(_encode_kernel, _encode_tuned, n, heads, tab.layers, args, meta)], *outputs


def encode_rows(
    keys: Sequence[Sequence[torch.Tensor]],
    values: Sequence[Sequence[torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
) -> list[RowCodes]:
    """Kernel version of `hf_scd.codec.encode_rows` (same arguments and results) for units of one layer coded per
    head: one launch for all layers' keys, one for their values."""
    keys, values = single_layers(keys), single_layers(values)
    key_runs, key_codes, key_scales = encode_launches(keys, cos, sin, rows, [pair[0] for pair in coders], True)
    value_runs, value_codes, value_scales = encode_launches(values, cos, sin, rows, [pair[1] for pair in coders], False)
    for run in key_runs + value_runs:
        run()
    return list(zip(key_codes, key_scales, value_codes, value_scales, strict=True))
