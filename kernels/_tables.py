"""Host-side tables the kernels read: a TransformCode's matrices and bit layout as small contiguous tensors.

Built once per (TransformCode, device) and cached, so a launch costs no host-side tensor work. The cache entry
dies with the TransformCode (weakref) and is rebuilt if any of its tensors is replaced or modified in place.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, fields

import torch

from hf_scd.codec import TransformCode, code_to_scale, rotate_half

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# fp32 accuracy for the transform dots. The interpreter does fp32 matmuls whatever is asked; on GPUs "tf32x3"
# (three TF32 tensor-core products) is about as accurate as fp32 FMA but much faster.
PRECISION = os.environ.get("HF_SCD_DOT_PRECISION", "tf32x3")


def next_pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, 1 << max(0, int(n) - 1).bit_length())


@dataclass
class CodeTables:
    heads: int
    dim: int  # d, rows of the encoder
    comps: int  # C, coefficients per head
    n_bytes: int  # packed bytes per token (all heads)
    bytes_pad: int  # power of two >= the largest head's byte count
    mean: torch.Tensor  # (H, d) fp32
    encoder: torch.Tensor  # (H, d, C) fp32
    decoder: torch.Tensor  # (H, C, d) fp32
    decoder_rot: torch.Tensor  # rotate_half of the decoder's output columns, so decode re-rotates with a 2nd dot
    out_mean: torch.Tensor  # (H, d) fp32, added after decoding
    out_mean_rot: torch.Tensor  # rotate_half(out_mean)
    byte_rel: torch.Tensor  # (H, C) int32 byte of a component's first bit, from its head's first byte
    byte_abs: torch.Tensor  # (H, C) int32 same, from the token's first byte
    shift: torch.Tensor  # (H, C) int32
    bits: torch.Tensor  # (H, C) int32
    step: torch.Tensor  # (H, C) fp32 quantizer step of a unit-RMS token (0 where 0 bits)
    head_start: torch.Tensor  # (H,) int32
    head_bytes: torch.Tensor  # (H,) int32
    kept: torch.Tensor  # (H,) fp32 components with bits > 0, at least 1 (the RMS divisor)
    scale_table: torch.Tensor  # (256,) fp32 code_to_scale of every scale code, exactly as the reference


_CACHE: dict[tuple[int, str], tuple[tuple, CodeTables]] = {}


def _stamp(code: TransformCode) -> tuple:
    return tuple((id(t), t.data_ptr(), t._version) for t in (getattr(code, f.name) for f in fields(code)))


def _build(code: TransformCode, device: torch.device) -> CodeTables:
    bits = code.bits.to(torch.int64).cpu()
    heads, comps = bits.shape
    mean = code.mean.to(device=device, dtype=torch.float32).contiguous()
    encoder = code.encoder.to(device=device, dtype=torch.float32).contiguous()
    decoder = code.decoder.to(device=device, dtype=torch.float32).contiguous()
    dim = mean.shape[-1]
    if encoder.shape != (heads, dim, comps) or decoder.shape != (heads, comps, dim):
        shapes = f"encoder {tuple(encoder.shape)}, decoder {tuple(decoder.shape)}, bits {tuple(bits.shape)}"
        raise ValueError(f"{shapes} do not fit together")
    if dim & (dim - 1) or comps & (comps - 1) or dim < 16 or comps < 16:
        raise ValueError(f"kernels need power-of-two head_dim and components >= 16, got {dim} and {comps}")
    byte, shift = code.layout.offsets
    head_bytes = (bits.sum(-1) + 7) // 8
    head_start = torch.cumsum(head_bytes, 0) - head_bytes
    byte = byte.long()

    def dev(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype).contiguous().to(device)

    return CodeTables(
        heads=heads,
        dim=dim,
        comps=comps,
        n_bytes=int(head_bytes.sum()),
        bytes_pad=next_pow2(int(head_bytes.max()) if heads else 1),
        mean=mean,
        encoder=encoder,
        decoder=decoder,
        decoder_rot=rotate_half(decoder).contiguous(),
        out_mean=code.out_mean.to(device=device, dtype=torch.float32).contiguous(),
        out_mean_rot=rotate_half(code.out_mean.to(device=device, dtype=torch.float32)).contiguous(),
        byte_rel=dev(byte - head_start[:, None], torch.int32),
        byte_abs=dev(byte, torch.int32),
        shift=dev(shift, torch.int32),
        bits=dev(bits, torch.int32),
        step=code.component_steps().to(device=device, dtype=torch.float32).contiguous(),
        head_start=dev(head_start, torch.int32),
        head_bytes=dev(head_bytes, torch.int32),
        kept=dev((bits > 0).sum(-1).clamp(min=1), torch.float32),
        scale_table=code_to_scale(torch.arange(256)).to(device=device, dtype=torch.float32).contiguous(),
    )


def tables(code: TransformCode, device: torch.device) -> CodeTables:
    """The (cached) kernel tables of `code` on `device`."""
    key = (id(code), str(device))
    stamp = _stamp(code)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if hit is None:
        weakref.finalize(code, _CACHE.pop, key, None)
    built = _build(code, device)
    _CACHE[key] = (stamp, built)
    return built
