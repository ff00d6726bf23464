"""Host-side tables the kernels read: the TransformCodes of several layers, stacked as small contiguous tensors.

One launch codes or decodes every layer of a cache, so its tables hold all the layers' matrices and bit layouts
side by side, indexed by (layer, head). They are built once per (sequence of TransformCodes, device) and cached, so
a launch costs no host-side tensor work; an entry dies with any of its TransformCodes (weakref) and is rebuilt if
any of their tensors is replaced or modified in place.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from hf_scd.codec import TransformCode, code_to_scale

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# fp32 accuracy for the transform dots. The interpreter does fp32 matmuls whatever is asked; on GPUs "tf32x3"
# (three TF32 tensor-core products) is about as accurate as fp32 FMA but much faster. HF_SCD_DOT_PRECISION overrides
# it for every dot.
_PRECISION_OVERRIDE = os.environ.get("HF_SCD_DOT_PRECISION")
PRECISION = _PRECISION_OVERRIDE or "tf32x3"


def decode_precision(dtype: torch.dtype) -> str:
    """Decoding into 16-bit outputs takes one TF32 product: its error, about 2^-11 of the summed terms, is far below
    the quantization error the codes carry (2^-3 to 2^-8 of a component) and about the output's own rounding, and it
    leaves the kernel a third of the tensor-core work and no register spills. fp32 outputs get fp32 accuracy."""
    if _PRECISION_OVERRIDE:
        return _PRECISION_OVERRIDE
    return PRECISION if dtype == torch.float32 else "tf32"


def next_pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, 1 << max(0, int(n) - 1).bit_length())


@dataclass
class CodeTables:
    """L layers' coders of one kind (keys or values), each indexed [layer, head, ...]; C is padded to the largest
    layer's with components of 0 bits."""

    layers: int
    heads: int
    dim: int  # d, rows of the encoder
    comps: int  # C, coefficients per head
    layer_bytes: list[int]  # packed bytes per token of each layer (all heads)
    bytes_pad: int  # power of two >= the largest head's byte count
    mean: torch.Tensor  # (L, H, d) fp32
    encoder: torch.Tensor  # (L, H, d, C) fp32
    decoder: torch.Tensor  # (L, H, C, d) fp32
    out_mean: torch.Tensor  # (L, H, d) fp32, added after decoding
    byte_rel: torch.Tensor  # (L, H, C) int32 byte of a component's first bit, from its head's first byte
    shift: torch.Tensor  # (L, H, C) int32
    bits: torch.Tensor  # (L, H, C) int32
    step: torch.Tensor  # (L, H, C) fp32 quantizer step of a unit-RMS token (0 where 0 bits)
    head_start: torch.Tensor  # (L, H) int32 a head's first byte, from its layer's first byte
    head_col: torch.Tensor  # (L, H) int32 same, in all layers' codes side by side
    head_bytes: torch.Tensor  # (L, H) int32
    kept: torch.Tensor  # (L, H) fp32 components with bits > 0, at least 1 (the RMS divisor)
    scale_table: torch.Tensor  # (256,) fp32 code_to_scale of every scale code, exactly as the reference


_CACHE: dict[tuple[tuple[int, ...], str], tuple[tuple, CodeTables]] = {}


def _stamp(codes: Sequence[TransformCode]) -> tuple:
    return tuple(
        (id(t), t.data_ptr(), t._version) for code in codes for t in (getattr(code, f.name) for f in fields(code))
    )


def _pad_comps(t: torch.Tensor, comps: int, dim: int) -> torch.Tensor:
    """Zero-pad dimension `dim` of `t` to `comps` entries."""
    pad = [0, 0] * (t.ndim - 1 - dim % t.ndim) + [0, comps - t.shape[dim]]
    return torch.nn.functional.pad(t, pad)


def _build(codes: Sequence[TransformCode], device: torch.device) -> CodeTables:
    heads, dim = codes[0].mean.shape
    comps = next_pow2(max(code.bits.shape[-1] for code in codes))
    per_layer: dict[str, list[torch.Tensor]] = {}
    layer_bytes = []
    for code in codes:
        bits = code.bits.to(torch.int64).cpu()
        c = bits.shape[-1]
        if code.encoder.shape != (heads, dim, c) or code.decoder.shape != (heads, c, dim):
            shapes = f"encoder {tuple(code.encoder.shape)}, decoder {tuple(code.decoder.shape)}"
            raise ValueError(f"{shapes} and bits {tuple(bits.shape)} do not fit a cache of {heads} x {dim}")
        byte, shift = (t.long() for t in code.layout.offsets)
        head_bytes, head_start = code.layout.head_bytes, code.layout.head_start
        parts = {
            "mean": code.mean.float().cpu(),
            "encoder": _pad_comps(code.encoder.float().cpu(), comps, -1),
            "decoder": _pad_comps(code.decoder.float().cpu(), comps, -2),
            "out_mean": code.out_mean.float().cpu(),
            # Padding components have 0 bits (and byte_rel 0: their head's first byte, like dropped components).
            "byte_rel": _pad_comps(byte - head_start[:, None], comps, -1),
            "shift": _pad_comps(shift, comps, -1),
            "bits": _pad_comps(bits, comps, -1),
            "step": _pad_comps(code.component_steps().float().cpu(), comps, -1),
            "head_start": head_start,
            "head_col": head_start + sum(layer_bytes),
            "head_bytes": head_bytes,
            "kept": (bits > 0).sum(-1).clamp(min=1).float(),
        }
        for name, t in parts.items():
            per_layer.setdefault(name, []).append(t)
        layer_bytes.append(code.layout.bytes_per_token)
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"kernels need a power-of-two head_dim >= 16, got {dim}")
    int_parts = {"byte_rel", "shift", "bits", "head_start", "head_col", "head_bytes"}
    stacked = {
        name: torch.stack(ts).to(torch.int32 if name in int_parts else torch.float32).contiguous().to(device)
        for name, ts in per_layer.items()
    }
    return CodeTables(
        layers=len(codes),
        heads=heads,
        dim=dim,
        comps=comps,
        layer_bytes=layer_bytes,
        bytes_pad=next_pow2(int(stacked["head_bytes"].max()) if heads else 1),
        scale_table=code_to_scale(torch.arange(256)).to(device=device, dtype=torch.float32).contiguous(),
        **stacked,
    )


def tables(codes: Sequence[TransformCode], device: torch.device) -> CodeTables:
    """The (cached) kernel tables of the layers' `codes` (one kind) on `device`."""
    key = (tuple(id(code) for code in codes), str(device))
    stamp = _stamp(codes)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if hit is None:
        for code in codes:
            weakref.finalize(code, _CACHE.pop, key, None)
    built = _build(codes, device)
    _CACHE[key] = (stamp, built)
    return built
