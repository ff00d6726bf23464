"""Fused decode kernel: gather each component's bytes -> extract code -> dequantize -> decoder dot -> + mean ->
re-rotate keys -> store into the output cache rows, one pass per (block of tokens, head)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_scd.codec import LayerCodes, TransformCode
from kernels._launch import autotuned, launch
from kernels._tables import PRECISION, tables


@triton.jit
def _decode_kernel(
    codes_ptr, scales_ptr, rows_ptr, cos_ptr, sin_ptr,
    dec_ptr, dec_rot_ptr, mean_ptr, mean_rot_ptr,
    byte_ptr, shift_ptr, bits_ptr, step_ptr, scale_table_ptr,
    out_ptr,
    N, seq, H, n_bytes,
    sct, scb, sst, ssh, sob, soh, sos, sod, scr, scd, ssr, ssd,
    ROTARY: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    t64 = t.to(tl.int64)
    c = tl.arange(0, C)

    # Unpack: a code spans byte_c and, when shift + bits > 8, byte_c + 1.
    byte = tl.load(byte_ptr + h * C + c)
    shift = tl.load(shift_ptr + h * C + c)
    bits = tl.load(bits_ptr + h * C + c)
    kept = bits > 0
    m_lo = tmask[:, None] & kept[None, :]
    m_hi = m_lo & ((shift + bits > 8) & (byte + 1 < n_bytes))[None, :]
    src = codes_ptr + t64[:, None] * sct + byte[None, :] * scb
    word = tl.load(src, mask=m_lo, other=0).to(tl.int32)
    word = word | (tl.load(src + scb, mask=m_hi, other=0).to(tl.int32) << 8)
    q = (word >> shift[None, :]) & ((1 << bits) - 1)[None, :]

    # Dequantize: (code - levels/2 + 0.5) * step * scale, 0 where the component has no bits.
    scode = tl.load(scales_ptr + t64 * sst + h * ssh, mask=tmask, other=0).to(tl.int32)
    step = tl.load(step_ptr + h * C + c)[None, :] * tl.load(scale_table_ptr + scode)[:, None]
    levels = (1 << bits).to(tl.float32)[None, :]
    unit = tl.where(kept[None, :], (q.to(tl.float32) - levels * 0.5 + 0.5) * step, 0.0)

    row = tl.load(rows_ptr + t, mask=tmask, other=0).to(tl.int64)
    b = row // seq
    s = row - b * seq
    base = b * sob + h * soh + s * sos
    for k in tl.static_range(0, D, BD):
        d = k + tl.arange(0, BD)
        w = h * C * D + c[:, None] * D + d[None, :]
        x = tl.dot(unit, tl.load(dec_ptr + w), input_precision=PRECISION) + tl.load(mean_ptr + h * D + d)[None, :]
        if ROTARY:
            # apply_rotary: x*cos + rotate_half(x)*sin, rotate_half(x) = unit @ rotate_half(dec) + rotate_half(mean).
            xr = tl.dot(unit, tl.load(dec_rot_ptr + w), input_precision=PRECISION)
            xr = xr + tl.load(mean_rot_ptr + h * D + d)[None, :]
            cs = tl.load(cos_ptr + row[:, None] * scr + d[None, :] * scd, mask=tmask[:, None], other=0.0)
            sn = tl.load(sin_ptr + row[:, None] * ssr + d[None, :] * ssd, mask=tmask[:, None], other=0.0)
            x = x * cs.to(tl.float32) + xr * sn.to(tl.float32)
        dst = out_ptr + base[:, None] + d[None, :] * sod
        tl.store(dst, x.to(out_ptr.dtype.element_ty), mask=tmask[:, None])


_decode_tuned = autotuned(_decode_kernel, key=["D", "C", "ROTARY"])


def decode_tensor(
    codes: torch.Tensor,
    scales: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    code: TransformCode,
    out: torch.Tensor,
    rotary: bool,
) -> None:
    """Decode packed codes (N, bytes) and scale codes (N, H) into tokens `rows` of `out` (batch, H, seq, d)."""
    tab = tables(code, out.device)
    batch, heads, seq, dim = out.shape
    if (heads, dim) != (tab.heads, tab.dim):
        raise ValueError(f"output has {heads} heads of dim {dim}, the code expects {tab.heads} x {tab.dim}")
    rows = rows.to(device=out.device, dtype=torch.int64).contiguous()
    n = rows.numel()
    if codes.shape != (n, tab.n_bytes) or scales.shape != (n, heads):
        raise ValueError(f"codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not match {n} rows")
    if n == 0 or heads == 0:
        return
    args = (
        codes, scales, rows, cos, sin,
        tab.decoder, tab.decoder_rot, tab.out_mean, tab.out_mean_rot,
        tab.byte_abs, tab.shift, tab.bits, tab.step, tab.scale_table,
        out,
        n, seq, heads, tab.n_bytes,
        *codes.stride(), *scales.stride(), *out.stride(), *cos.stride(), *sin.stride(),
    )  # fmt: skip
    meta = dict(ROTARY=rotary, D=dim, C=tab.comps, BD=min(dim, 64), PRECISION=PRECISION)
    launch(_decode_kernel, _decode_tuned, n, heads, args, meta)


def decode_rows(
    codes: LayerCodes,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    key_code: TransformCode,
    value_code: TransformCode,
    out_keys: torch.Tensor,
    out_values: torch.Tensor,
) -> None:
    """Kernel version of `hf_scd.codec.decode_rows` (same arguments, writes in place): one launch for K, one for V."""
    decode_tensor(codes.key_codes, codes.key_scales, cos, sin, rows, key_code, out_keys, rotary=True)
    decode_tensor(codes.value_codes, codes.value_scales, cos, sin, rows, value_code, out_values, rotary=False)
