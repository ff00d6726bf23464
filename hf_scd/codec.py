"""The SCD math in plain torch: the reference implementation and the CPU path.

A layer's keys (de-rotated: RoPE removed, so they live in a position-free content space) and values are coded per
KV head by transform coding: centre, project on a calibrated orthonormal basis whose components are ordered by
variance, normalise each component by its calibrated spread and each token by its own RMS, then quantize every
component with the number of bits the plan gives it (0 bits drops it) and pack the bits. Decoding inverts each step.
Kernels in `kernels/` implement the same functions for CUDA tensors; this file is their reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

MAX_BITS = 8


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the Llama family applies it; x is (..., seq, head_dim), cos/sin broadcast against it."""
    return x * cos + rotate_half(x) * sin


def remove_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `apply_rotary`, also when cos/sin carry an attention scaling factor (YaRN, LongRoPE)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


@dataclass(frozen=True)
class BitLayout:
    """Where each component's bits sit in a token's packed bit stream, for one bit allocation (heads, dim)."""

    bits: torch.Tensor  # (heads, dim) uint8

    @cached_property
    def stream(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat component index, bit index) of every bit of a token's stream, heads then components in order."""
        flat = self.bits.reshape(-1).long()
        component = torch.repeat_interleave(torch.arange(flat.numel()), flat)
        first = torch.cumsum(flat, 0) - flat
        bit = torch.arange(component.numel()) - first[component]
        return component, bit

    @property
    def bits_per_token(self) -> int:
        return int(self.bits.sum())

    @property
    def bytes_per_token(self) -> int:
        return (self.bits_per_token + 7) // 8


def pack_codes(codes: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """(tokens, heads, dim) integer codes -> (tokens, bytes_per_token) uint8, little-endian bit order."""
    component, bit = (t.to(codes.device) for t in layout.stream)
    stream = (codes.reshape(codes.shape[0], -1)[:, component].to(torch.int32) >> bit.to(torch.int32)) & 1
    pad = layout.bytes_per_token * 8 - stream.shape[1]
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(codes.shape[0], -1, 8)
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """Inverse of `pack_codes`: (tokens, bytes) uint8 -> (tokens, heads, dim) int32 codes (0 where 0 bits)."""
    component, bit = (t.to(packed.device) for t in layout.stream)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)
    stream = stream[:, : component.numel()]
    heads, dim = layout.bits.shape
    codes = torch.zeros(packed.shape[0], heads * dim, dtype=torch.int32, device=packed.device)
    codes.index_add_(1, component, stream << bit.to(torch.int32))
    return codes.reshape(-1, heads, dim)


@dataclass
class TransformCode:
    """Calibrated transform coder of one layer's keys or values (all KV heads), at one bit allocation.

    mean (H, d), basis (H, d, d) with components as columns in variance order, scale (H, d) the spread of each
    component, steps (MAX_BITS + 1,) the quantizer step per bit width for a unit-spread coefficient, bits (H, d).
    """

    mean: torch.Tensor
    basis: torch.Tensor
    scale: torch.Tensor
    steps: torch.Tensor
    bits: torch.Tensor

    @cached_property
    def layout(self) -> BitLayout:
        return BitLayout(self.bits.to(torch.uint8).cpu())

    def _step(self, device: torch.device) -> torch.Tensor:
        """Per-component step (H, d) in coefficient units; 0 bits gets step 0 (unused)."""
        return (self.steps.to(device)[self.bits.long().to(device)] * self.scale.to(device)).float()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, H, d) -> packed codes (tokens, bytes) uint8 and per-token scales (tokens, H) fp16."""
        device = x.device
        bits = self.bits.to(device).float()
        kept = bits > 0
        z = torch.einsum("nhd,hdc->nhc", x.float() - self.mean.to(device), self.basis.to(device))
        unit = z / self.scale.to(device)
        kept_count = kept.sum(-1).clamp(min=1)
        rms = ((unit * unit * kept).sum(-1) / kept_count).sqrt().clamp(min=1e-6)
        token_scale = rms.to(torch.float16)
        levels = torch.exp2(bits)
        step = self._step(device) * token_scale.float().unsqueeze(-1)
        ratio = torch.where(kept, z / torch.where(kept, step, 1.0), 0.0)
        codes = torch.minimum(torch.clamp(torch.floor(ratio) + levels / 2, min=0), levels - 1)
        codes = torch.where(kept, codes, 0.0).to(torch.int32)
        return pack_codes(codes, self.layout), token_scale

    def decode(self, packed: torch.Tensor, token_scale: torch.Tensor) -> torch.Tensor:
        """Packed codes and per-token scales -> (tokens, H, d) float32 reconstruction."""
        device = packed.device
        bits = self.bits.to(device).float()
        codes = unpack_codes(packed, self.layout).float()
        step = self._step(device) * token_scale.float().unsqueeze(-1)
        z = torch.where(bits > 0, (codes - torch.exp2(bits) / 2 + 0.5) * step, 0.0)
        return torch.einsum("nhc,hdc->nhd", z, self.basis.to(device)) + self.mean.to(device)

    def bytes_for(self, tokens: int) -> int:
        """Bytes of codes and scales this coder emits for `tokens` tokens."""
        return tokens * (self.layout.bytes_per_token + 2 * self.bits.shape[0])


@dataclass
class LayerCodes:
    """What one layer puts on the wire: packed codes and per-token scales for K and for V (real tokens only)."""

    key_codes: torch.Tensor
    key_scales: torch.Tensor
    value_codes: torch.Tensor
    value_scales: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


def encode_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    token_mask: torch.Tensor,
    key_code: TransformCode,
    value_code: TransformCode,
) -> LayerCodes:
    """Cached post-RoPE keys and values (batch, heads, seq, dim) -> codes of the tokens where `token_mask` is set.

    Keys are de-rotated with the exact (cos, sin) (batch, seq, dim) they were rotated with.
    """
    content_keys = remove_rotary(keys.float(), cos.unsqueeze(1).float(), sin.unsqueeze(1).float())
    key_codes, key_scales = key_code.encode(content_keys.transpose(1, 2)[token_mask])
    value_codes, value_scales = value_code.encode(values.float().transpose(1, 2)[token_mask])
    return LayerCodes(key_codes, key_scales, value_codes, value_scales)


def decode_layer(
    codes: LayerCodes,
    cos: torch.Tensor,
    sin: torch.Tensor,
    token_mask: torch.Tensor,
    key_code: TransformCode,
    value_code: TransformCode,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes -> keys and values (batch, heads, seq, dim) in `dtype`; keys re-rotated with the given (cos, sin).

    Tokens outside `token_mask` (padding) come back as zeros: attention masks them anyway.
    """
    batch, seq = token_mask.shape
    heads, dim = key_code.bits.shape

    def scatter(rows: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(batch, seq, heads, dim, dtype=rows.dtype, device=rows.device)
        full[token_mask] = rows
        return full.transpose(1, 2)

    keys = scatter(key_code.decode(codes.key_codes, codes.key_scales))
    keys = apply_rotary(keys, cos.unsqueeze(1).float(), sin.unsqueeze(1).float())
    values = scatter(value_code.decode(codes.value_codes, codes.value_scales))
    return keys.to(dtype), values.to(dtype)
