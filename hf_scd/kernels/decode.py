"""Fused decode kernel: load each token's bytes -> pick out each component's code (8-bit one-hot products) ->
half-integer codes @ bf16 pieces of step * decoder -> * scale + mean -> re-rotate keys -> store into the output
cache rows, one pass per (block of tokens, head, layer), and one launch for every layer of a cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from hf_scd.codes import CoderPair, LayerCodes, TransformCode

from ._bf16 import MMA_DTYPE
from ._launch import KernelLaunch, autotuned, cache_tables, layer_pointers, single_layers, unit_stride
from ._rotary import load_rotary
from ._rows import program_rows
from ._tables import BYTE_CHUNK, DECODER_PIECES


@triton.jit
def _reconstruct(half_codes, scale, dec_ptr, piece_stride, mean_ptr, c, d, D: tl.constexpr, PIECES: tl.constexpr):
    """Output columns d: scale * (half_codes @ (step * decoder)) + mean. The half-integer codes are exact in bf16,
    so the product is as accurate as the pieces of the matrix it takes."""
    w = dec_ptr + c[:, None] * D + d[None, :]
    x = tl.dot(half_codes, tl.load(w).to(MMA_DTYPE))
    for piece in tl.static_range(1, PIECES):
        x = tl.dot(half_codes, tl.load(w + piece * piece_stride).to(MMA_DTYPE), x)
    return x * scale[:, None] + tl.load(mean_ptr + d)[None, :]


@triton.jit
def _decode_kernel(
    codes_ptr, codes_off_ptr, scales_ptr, scales_off_ptr, rows_ptr, cos_ptr, sin_ptr,
    dec_ptr, dec_piece_stride, mean_ptr, byte_ptr, shift_ptr, bits_ptr, head_start_ptr, head_bytes_ptr,
    scale_table_ptr,
    out_ptr, out_off_ptr,
    N, seq, H,
    sct, sst, sob, soh, sos, scr, ssr,
    ROTARY: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BYTES_PAD: tl.constexpr, BJ: tl.constexpr,
    BD: tl.constexpr, PIECES: tl.constexpr, OUT_ALIGN: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    t, tmask, row, b, s = program_rows(rows_ptr, N, seq, BLOCK_T)
    h = tl.program_id(1)
    layer = tl.program_id(2)
    lh = layer * H + h
    t64 = t.to(tl.int64)
    c = tl.arange(0, C)

    # Unpack: each token's bytes of this head are read BJ at a time, up to the end of the chunk holding its last byte,
    # and a component's two bytes (byte_c, byte_c + 1) are picked out of them by 8-bit integer products with one-hot
    # matrices: bytes offset by -128 to fit int8 and the offset added back, for byte_c + 1 only where it lies in the
    # chunks read (bytes past the head's read as 0).
    byte = tl.load(byte_ptr + lh * C + c)
    shift = tl.load(shift_ptr + lh * C + c)
    bits = tl.load(bits_ptr + lh * C + c)
    src = codes_ptr + tl.load(codes_off_ptr + layer) + t64[:, None] * sct + tl.load(head_start_ptr + lh)
    head_bytes = tl.load(head_bytes_ptr + lh)
    read_end = tl.cdiv(head_bytes, BJ) * BJ  # chunks are padded to the launch's longest head; a shorter one stops
    low = tl.full((BLOCK_T, C), 128, tl.int32)
    high = 128 * (byte + 1 < read_end).to(tl.int32)[None, :] + tl.zeros((BLOCK_T, C), tl.int32)
    for j0 in tl.static_range(0, BYTES_PAD, BJ):
        if j0 < read_end:
            j = j0 + tl.arange(0, BJ)
            raw = tl.load(src + j[None, :], mask=tmask[:, None] & (j < head_bytes)[None, :], other=0)
            raw = (raw.to(tl.int32) - 128).to(tl.int8)
            low = tl.dot(raw, (j[:, None] == byte[None, :]).to(tl.int8), low)
            high = tl.dot(raw, (j[:, None] == byte[None, :] + 1).to(tl.int8), high)
    q = ((low | (high << 8)) >> shift[None, :]) & ((1 << bits) - 1)[None, :]

    # Dequantize: (code - levels/2 + 0.5) * step * scale; step sits in the decoder's rows (0 where no bits), the
    # token's scale is applied after the product.
    scales_layer = scales_ptr + tl.load(scales_off_ptr + layer)
    scode = tl.load(scales_layer + t64 * sst + h, mask=tmask, other=0).to(tl.int32)
    scale = tl.load(scale_table_ptr + scode)
    half_codes = (q.to(tl.float32) - (1 << bits).to(tl.float32)[None, :] * 0.5 + 0.5).to(MMA_DTYPE)

    out_layer = out_ptr + tl.multiple_of(tl.load(out_off_ptr + layer), OUT_ALIGN)
    dst = out_layer + (b * sob + h * soh + s * sos)[:, None]
    dec_ptr += lh * C * D
    mean_ptr += lh * D
    if ROTARY:
        # apply_rotary: x*cos + rotate_half(x)*sin, where rotate_half(x) = (-x_hi, x_lo): each chunk's two halves
        # are reconstructed once each and rotated against each other.
        for k in tl.static_range(0, D // 2, BD):
            lo = k + tl.arange(0, BD)
            hi = lo + D // 2
            x_lo = _reconstruct(half_codes, scale, dec_ptr, dec_piece_stride, mean_ptr, c, lo, D, PIECES)
            x_hi = _reconstruct(half_codes, scale, dec_ptr, dec_piece_stride, mean_ptr, c, hi, D, PIECES)
            c_lo, c_hi, s_lo, s_hi = load_rotary(cos_ptr, sin_ptr, row, scr, ssr, lo, hi, tmask)
            out_lo = x_lo * c_lo - x_hi * s_lo
            out_hi = x_hi * c_hi + x_lo * s_hi
            tl.store(dst + lo[None, :], out_lo.to(out_ptr.dtype.element_ty), mask=tmask[:, None])
            tl.store(dst + hi[None, :], out_hi.to(out_ptr.dtype.element_ty), mask=tmask[:, None])
    else:
        for k in tl.static_range(0, D, BD):
            d = k + tl.arange(0, BD)
            x = _reconstruct(half_codes, scale, dec_ptr, dec_piece_stride, mean_ptr, c, d, D, PIECES)
            tl.store(dst + d[None, :], x.to(out_ptr.dtype.element_ty), mask=tmask[:, None])


_decode_tuned = autotuned(_decode_kernel, key=["D", "C", "ROTARY", "BYTES_PAD"])


def decode_launches(
    codes: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[TransformCode],
    outs: Sequence[torch.Tensor],
    rotary: bool,
) -> list[KernelLaunch]:
    """The launches decoding every layer's packed codes (N, bytes) and scale codes (N, H) of one kind into tokens
    `rows` of its output (batch, H, seq, d): one for all layers; one a layer where the layers' codes, scales or
    outputs differ in strides or dtype; none for no rows."""
    if not codes:
        return []
    codes = [unit_stride(t) for t in codes]
    scales = [unit_stride(t) for t in scales]
    if any(out.stride(-1) != 1 for out in outs):
        raise ValueError("decode outputs must be contiguous in head_dim, as attention reads them")
    pointers = [layer_pointers(group) for group in (codes, scales, outs)]
    if None in pointers:
        apart = zip(codes, scales, coders, outs, strict=True)
        return [
            run
            for packed, scale, coder, out in apart
            for run in decode_launches([packed], [scale], cos, sin, rows, [coder], [out], rotary)
        ]
    code_ptrs, scale_ptrs, out_ptrs = pointers
    tab, (batch, heads, seq, dim), rows = cache_tables(outs, coders, rows)
    n = rows.numel()
    for index, (packed, scale) in enumerate(zip(codes, scales, strict=True)):
        if packed.shape != (n, tab.layer_bytes[index]) or scale.shape != (n, heads):
            raise ValueError(f"layer {index}: codes {tuple(packed.shape)} / scales {tuple(scale.shape)} do not match")
    if n == 0 or heads == 0:
        return []
    cos, sin = unit_stride(cos), unit_stride(sin)
    args = (
        code_ptrs.base, code_ptrs.offsets, scale_ptrs.base, scale_ptrs.offsets, rows, cos, sin,
        tab.decoder, tab.decoder.stride(0), tab.out_mean, tab.byte_rel, tab.shift, tab.bits, tab.head_start,
        tab.head_bytes, tab.scale_table,
        out_ptrs.base, out_ptrs.offsets,
        n, seq, heads,
        code_ptrs.base.stride(0), scale_ptrs.base.stride(0), *out_ptrs.base.stride()[:3],
        cos.stride(0), sin.stride(0),
    )  # fmt: skip
    meta = dict(
        ROTARY=rotary, D=dim, C=tab.comps, BYTES_PAD=tab.bytes_pad, BJ=BYTE_CHUNK,
        BD=min(dim // 2 if rotary else dim, 64), PIECES=DECODER_PIECES[out_ptrs.base.dtype], OUT_ALIGN=out_ptrs.align,
    )  # fmt: skip
    return [KernelLaunch(_decode_kernel, _decode_tuned, n, heads, tab.layers, args, meta)]


def decode_rows(
    codes: Sequence[LayerCodes],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
    out_keys: Sequence[Sequence[torch.Tensor]],
    out_values: Sequence[Sequence[torch.Tensor]],
) -> None:
    """Kernel version of `hf_scd.codec.decode_rows` (same arguments, writes in place) for units of one layer coded
    per head: one launch for all layers' keys, one for their values."""
    out_keys, out_values = single_layers(out_keys), single_layers(out_values)
    runs = [
        run
        for kind, outs in (("key", out_keys), ("value", out_values))
        for run in decode_launches(
            [getattr(layer, f"{kind}_codes") for layer in codes],
            [getattr(layer, f"{kind}_scales") for layer in codes],
            cos,
            sin,
            rows,
            [pair[kind == "value"] for pair in coders],
            outs,
            rotary=kind == "key",
        )
    ]
    for run in runs:
        run()
