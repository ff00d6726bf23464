"""Fused encode kernel: gather rows -> de-rotate keys -> centre -> encoder dot -> RMS -> scale code -> quantize ->
pack, in one pass per (block of tokens, head). Only the packed codes and scale codes reach global memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_scd.codec import TransformCode
from kernels._launch import autotuned, launch
from kernels._tables import PRECISION, tables


@triton.jit
def _encode_kernel(
    x_ptr, cos_ptr, sin_ptr, rows_ptr,
    mean_ptr, enc_ptr, byte_ptr, shift_ptr, bits_ptr, step_ptr,
    head_start_ptr, head_bytes_ptr, kept_ptr, scale_table_ptr,
    codes_ptr, scales_ptr,
    N, seq, H, codes_stride,
    sxb, sxh, sxs, sxd, scr, scd, ssr, ssd,
    ROTARY: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BYTES_PAD: tl.constexpr, BJ: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    row = tl.load(rows_ptr + t, mask=tmask, other=0).to(tl.int64)
    b = row // seq
    s = row - b * seq
    base = b * sxb + h * sxh + s * sxs
    c = tl.arange(0, C)

    # unit = (content - mean) @ encoder[h], accumulated over chunks of BK input columns.
    unit = tl.zeros((BLOCK_T, C), dtype=tl.float32)
    for k in tl.static_range(0, D, BK):
        d = k + tl.arange(0, BK)
        x = tl.load(x_ptr + base[:, None] + d[None, :] * sxd, mask=tmask[:, None], other=0.0).to(tl.float32)
        if ROTARY:
            # remove_rotary: (x*cos - rotate_half(x)*sin) / (cos^2 + sin^2); rotate_half via a permuted reload.
            partner = (d + D // 2) % D
            xp = tl.load(x_ptr + base[:, None] + partner[None, :] * sxd, mask=tmask[:, None], other=0.0)
            xp = xp.to(tl.float32)
            rot = tl.where(d[None, :] < D // 2, -xp, xp)
            cs = tl.load(cos_ptr + row[:, None] * scr + d[None, :] * scd, mask=tmask[:, None], other=1.0)
            sn = tl.load(sin_ptr + row[:, None] * ssr + d[None, :] * ssd, mask=tmask[:, None], other=0.0)
            cs = cs.to(tl.float32)
            sn = sn.to(tl.float32)
            x = tl.math.div_rn(x * cs - rot * sn, cs * cs + sn * sn)
        x = x - tl.load(mean_ptr + h * D + d)[None, :]
        enc = tl.load(enc_ptr + h * D * C + d[:, None] * C + c[None, :])
        unit = tl.dot(x, enc, unit, input_precision=PRECISION)

    # Per token-head RMS over kept components -> log scale code -> per-component step.
    bits = tl.load(bits_ptr + h * C + c)
    kept = (bits > 0)[None, :]
    power = tl.sum(tl.where(kept, unit * unit, 0.0), axis=1)
    rms = tl.math.sqrt_rn(tl.math.div_rn(power, tl.load(kept_ptr + h)))
    scode = tl.floor(tl.log2(tl.maximum(rms, 0.00390625)) * 16.0 + 0.5) + 128.0
    scode = tl.minimum(tl.maximum(scode, 0.0), 255.0).to(tl.int32)
    scale = tl.load(scale_table_ptr + scode)
    step = tl.load(step_ptr + h * C + c)[None, :] * scale[:, None]
    levels = (1 << bits).to(tl.float32)[None, :]
    ratio = tl.math.div_rn(unit, tl.where(kept, step, 1.0))
    q = tl.minimum(tl.maximum(tl.floor(ratio) + levels * 0.5, 0.0), levels - 1.0)
    q = tl.where(kept, q, 0.0).to(tl.int32)

    # Pack: component c adds (q << shift) & 255 to byte byte_c and (q << shift) >> 8 to byte_c + 1. Bits of
    # different components are disjoint, so per-byte sums (< 256, exact in fp16 products / fp32 sums) are ORs.
    shifted = q << tl.load(shift_ptr + h * C + c)[None, :]
    lo = (shifted & 255).to(tl.float16)
    hi = (shifted >> 8).to(tl.float16)
    byte = tl.load(byte_ptr + h * C + c)
    head_bytes = tl.load(head_bytes_ptr + h)
    out = codes_ptr + t.to(tl.int64)[:, None] * codes_stride + tl.load(head_start_ptr + h)
    for j0 in tl.static_range(0, BYTES_PAD, BJ):
        j = j0 + tl.arange(0, BJ)
        onehot_lo = (byte[:, None] == j[None, :]).to(tl.float16)
        onehot_hi = (byte[:, None] + 1 == j[None, :]).to(tl.float16)
        packed = tl.dot(lo, onehot_lo)
        packed = tl.dot(hi, onehot_hi, packed)
        tl.store(out + j[None, :], packed.to(tl.int32).to(tl.uint8), mask=tmask[:, None] & (j[None, :] < head_bytes))
    tl.store(scales_ptr + t.to(tl.int64) * H + h, scode.to(tl.uint8), mask=tmask)


_encode_tuned = autotuned(_encode_kernel, key=["D", "C", "ROTARY", "BYTES_PAD"])


def _block_k(dim: int) -> int:
    return min(dim, 64)


def encode_tensor(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, code: TransformCode, rotary: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code tokens `rows` of one cache tensor (batch, H, seq, d): packed codes (N, bytes) and scale codes (N, H)."""
    tab = tables(code, x.device)
    batch, heads, seq, dim = x.shape
    if (heads, dim) != (tab.heads, tab.dim):
        raise ValueError(f"cache has {heads} heads of dim {dim}, the code expects {tab.heads} x {tab.dim}")
    rows = rows.to(device=x.device, dtype=torch.int64).contiguous()
    n = rows.numel()
    codes = torch.empty(n, tab.n_bytes, dtype=torch.uint8, device=x.device)
    scales = torch.empty(n, heads, dtype=torch.uint8, device=x.device)
    if n == 0 or heads == 0:
        return codes, scales
    args = (
        x, cos, sin, rows,
        tab.mean, tab.encoder, tab.byte_rel, tab.shift, tab.bits, tab.step,
        tab.head_start, tab.head_bytes, tab.kept, tab.scale_table,
        codes, scales,
        n, seq, heads, codes.stride(0),
        *x.stride(), *cos.stride(), *sin.stride(),
    )  # fmt: skip
    meta = dict(
        ROTARY=rotary, D=dim, C=tab.comps, BK=_block_k(dim), BYTES_PAD=tab.bytes_pad,
        BJ=min(tab.bytes_pad, 64), PRECISION=PRECISION,
    )  # fmt: skip
    launch(_encode_kernel, _encode_tuned, n, heads, args, meta)
    return codes, scales


def encode_rows(
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    key_code: TransformCode,
    value_code: TransformCode,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel version of `hf_scd.codec.encode_rows` (same arguments and results): one launch for K, one for V."""
    key_codes, key_scales = encode_tensor(keys, cos, sin, rows, key_code, rotary=True)
    value_codes, value_scales = encode_tensor(values, cos, sin, rows, value_code, rotary=False)
    return key_codes, key_scales, value_codes, value_scales
