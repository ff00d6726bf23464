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

from hf_scd.codes import TransformCode, code_to_scale

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BYTE_CHUNK = 32  # packed bytes a head's codes are packed and unpacked in: the K of an 8-bit integer product
# bf16 pieces of the encoder: 16 bits, 2^-17 relative; codes land one step off the fp32 reference's on 1e-5 to 5e-5
# of components, at quantizer boundaries (`python -m hf_scd.kernels.accuracy`).
ENCODER_PIECES = 2
# bf16 pieces of step * decoder a decode into each dtype takes: one adds ~2^-9 of the data's magnitude to a bf16
# output, about its own rounding and far below the codes' quantization error; two and three are exact to below the
# rounding of fp16 and fp32.
DECODER_PIECES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def next_pow2(n: int, at_least: int = 32) -> int:
    """The padded component count: a power of two, and at least the K of an 8-bit integer product (the packing)."""
    return max(at_least, 1 << max(0, int(n) - 1).bit_length())


def bf16_pieces(t: torch.Tensor, pieces: int) -> torch.Tensor:
    """(pieces, *t.shape) bf16 that sum to `t` to about 8 * pieces bits: each is the rounding of what the ones
    before it left over (3 pieces hold an fp32 exactly)."""
    rest = t.double()
    out = []
    for _ in range(pieces):
        out.append(rest.float().to(torch.bfloat16))
        rest = rest - out[-1].double()
    return torch.stack(out)


@dataclass
class CodeTables:
    """L layers' coders of one kind (keys or values), each indexed [layer, head, ...]; C is padded to the largest
    layer's with components of 0 bits."""

    layers: int
    heads: int
    dim: int  # d, rows of the encoder
    comps: int  # C, coefficients per head: a power of two >= 32
    layer_bytes: list[int]  # packed bytes per token of each layer (all heads)
    bytes_pad: int  # the largest head's byte count, rounded up to a multiple of BYTE_CHUNK
    mean: torch.Tensor  # (L, H, d) fp32
    mean_code: torch.Tensor  # (L, H, C) fp32 mean @ encoder, subtracted after projecting an uncentred row
    encoder: torch.Tensor  # (ENCODER_PIECES, L, H, d, C) bf16 pieces
    decoder: torch.Tensor  # (3, L, H, C, d) bf16 pieces of step[c] * decoder[c, :]: a half-integer code's row
    out_mean: torch.Tensor  # (L, H, d) fp32, added after decoding
    byte_rel: torch.Tensor  # (L, H, C) int32 byte of a component's first bit, from its head's first byte
    byte_count: torch.Tensor  # (L, H, bytes_pad) int32 components whose first bit is in each byte
    shift: torch.Tensor  # (L, H, C) int32
    bits: torch.Tensor  # (L, H, C) int32
    step: torch.Tensor  # (L, H, C) fp32 quantizer step of a unit-RMS token (0 where 0 bits)
    head_start: torch.Tensor  # (L, H) int32 a head's first byte, from its layer's first byte
    head_col: torch.Tensor  # (L, H) int32 same, in all layers' codes side by side
    head_bytes: torch.Tensor  # (L, H) int32
    kept: torch.Tensor  # (L, H) fp32 components with bits > 0, at least 1 (the RMS divisor)
    peak: torch.Tensor  # (L, H, C) fp32 `TransformCode.peak_limits`: 0 below PEAK_BITS bits
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
        encoder, step = code.encoder.double().cpu(), code.component_steps().double().cpu()
        parts = {
            "mean": code.mean.float().cpu(),
            "mean_code": _pad_comps(torch.einsum("hd,hdc->hc", code.mean.double().cpu(), encoder), comps, -1),
            "encoder": _pad_comps(bf16_pieces(encoder, ENCODER_PIECES), comps, -1),
            "decoder": _pad_comps(bf16_pieces(step[..., None] * code.decoder.double().cpu(), 3), comps, -2),
            "out_mean": code.out_mean.float().cpu(),
            # Padding components have 0 bits (and byte_rel 0: their head's first byte, like dropped components).
            "byte_rel": _pad_comps(byte - head_start[:, None], comps, -1),
            "shift": _pad_comps(shift, comps, -1),
            "bits": _pad_comps(bits, comps, -1),
            "step": _pad_comps(step, comps, -1),
            "head_start": head_start,
            "head_col": head_start + sum(layer_bytes),
            "head_bytes": head_bytes,
            "kept": (bits > 0).sum(-1).clamp(min=1).float(),
            "peak": _pad_comps(code.peak_limits().float().cpu(), comps, -1),
        }
        for name, t in parts.items():
            per_layer.setdefault(name, []).append(t)
        layer_bytes.append(code.layout.bytes_per_token)
    if dim & (dim - 1) or dim < 32:
        raise ValueError(f"kernels need a power-of-two head_dim >= 32, got {dim}")
    stacked = {name: torch.stack(ts) for name, ts in per_layer.items()}
    longest = int(stacked["head_bytes"].max()) if heads else 1
    bytes_pad = max(1, -(-longest // BYTE_CHUNK)) * BYTE_CHUNK
    stacked["byte_count"] = (stacked["byte_rel"][..., None] == torch.arange(bytes_pad)).sum(-2)
    for name in ("encoder", "decoder"):  # (L, pieces, ...) -> (pieces, L, ...): one piece stride for all layers
        stacked[name] = stacked[name].movedim(1, 0)
    kinds = {"encoder": torch.bfloat16, "decoder": torch.bfloat16}
    int_parts = ("byte_rel", "shift", "bits", "head_start", "head_col", "head_bytes", "byte_count")
    kinds |= dict.fromkeys(int_parts, torch.int32)
    tensors = {name: t.to(kinds.get(name, torch.float32)).contiguous().to(device) for name, t in stacked.items()}
    return CodeTables(
        layers=len(codes),
        heads=heads,
        dim=dim,
        comps=comps,
        layer_bytes=layer_bytes,
        bytes_pad=bytes_pad,
        scale_table=code_to_scale(torch.arange(256)).to(device=device, dtype=torch.float32).contiguous(),
        **tensors,
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
