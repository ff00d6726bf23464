"""The SCD math in plain torch: the reference implementation and the CPU path.

A layer's keys (de-rotated: RoPE removed, so they live in a position-free content space) and values are coded per
KV head by transform coding. Each head's vector is centred and multiplied by a calibrated encoder matrix whose
columns give unit-spread coefficients in order of importance; each token's coefficients are normalised by their RMS
(shipped as an 8-bit log code), quantized with the number of bits the plan gives each component (0 bits drops it),
and packed. Decoding multiplies the dequantized coefficients by the decoder matrix. Encoder and decoder are
separate inputs, not one orthonormal basis, so a weighted metric (keys weighted by query energy, values by the
output projection) and a decoder fitted for another model both fit the same code path.

The first few tokens of every row (the attention sink) are not coded: they carry most of the attention mass and
ship exactly, in bf16.

Kernels in `kernels/` implement `encode_rows` / `decode_rows` (all layers of a cache at once) for CUDA tensors; this
file is their reference and never imports them (`backend.py` chooses between the two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .codes import BitLayout, CoderPair, LayerCodes, RowCodes, TransformCode, code_to_scale, scale_to_code


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the Llama family applies it; x is (..., seq, head_dim), cos/sin broadcast against it."""
    return x * cos + rotate_half(x) * sin


def remove_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `apply_rotary`, also when cos/sin carry an attention scaling factor (YaRN, LongRoPE)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def pack_codes(codes: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """(tokens, heads, dim) integer codes (0 where 0 bits) -> (tokens, bytes_per_token) uint8."""
    byte, shift = (t.to(codes.device).reshape(-1).long() for t in layout.offsets)
    shifted = codes.reshape(codes.shape[0], layout.bits.numel()).to(torch.int32) << shift.to(torch.int32)
    # Two spare columns: a dropped component of a trailing empty head points one past the end, and its next byte two.
    packed = torch.zeros(codes.shape[0], layout.bytes_per_token + 2, dtype=torch.int32, device=codes.device)
    # Bits of different components never overlap, so adding them is OR-ing them.
    packed.index_add_(1, byte, shifted & 0xFF)
    packed.index_add_(1, byte + 1, shifted >> 8)
    return packed[:, : layout.bytes_per_token].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """Inverse of `pack_codes`: (tokens, bytes) uint8 -> (tokens, heads, dim) int16 codes (0 where 0 bits).

    Each component's two bytes are gathered side by side and read as one little-endian int16 (a code of at most 8
    bits at a shift of at most 7 sits in its low 15 bits, so the sign bit never matters)."""
    byte_pairs, shift, mask = _unpack_tables(layout, packed.device)
    padded = torch.nn.functional.pad(packed, (0, 2))
    words = padded.index_select(1, byte_pairs).view(torch.int16)
    return ((words >> shift) & mask).reshape(packed.shape[0], *layout.bits.shape)


def _unpack_tables(layout: BitLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(byte, byte + 1) of every component, interleaved, its shift and its bit mask; made once per layout."""
    tables = layout.__dict__.setdefault("_unpack_tables", {})
    if device not in tables:
        byte, shift = (t.reshape(-1).to(device) for t in layout.offsets)
        pairs = torch.stack([byte.long(), byte.long() + 1], -1).reshape(-1)
        mask = (1 << layout.bits.reshape(-1).to(device, torch.int32)) - 1
        tables[device] = (pairs, shift.to(torch.int16), mask.to(torch.int16))
    return tables[device]


@dataclass(frozen=True)
class _Derived:
    """What coding with one `TransformCode` needs besides its inputs, computed once per coder: the encoder with the
    dropped components' columns zeroed, quantizer steps (1 where dropped, so 0 / 1 codes them 0), levels, the mid
    offset of each code, and the decoder with each component's step folded in (zero rows where dropped)."""

    encoder: torch.Tensor
    kept: torch.Tensor
    steps: torch.Tensor
    levels: torch.Tensor
    offsets: torch.Tensor
    decoder: torch.Tensor


def _derived(code: TransformCode) -> _Derived:
    derived = code.__dict__.get("_derived")
    if derived is None:
        bits = code.bits.float()
        kept = bits > 0
        steps = code.component_steps()
        levels = torch.exp2(bits)
        derived = _Derived(
            encoder=code.encoder * kept.unsqueeze(1),
            kept=kept.sum(-1).clamp(min=1).float(),
            steps=torch.where(kept, steps, 1.0),
            levels=levels,
            offsets=torch.where(kept, levels / 2 - 0.5, 0.0),
            decoder=code.decoder * steps.unsqueeze(-1),
        )
        code.__dict__["_derived"] = derived
    return derived


def encode_vectors(code: TransformCode, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, H, d) -> packed codes (tokens, bytes) uint8 and per-token scale codes (tokens, H) uint8."""
    derived = _derived(code)
    unit = torch.einsum("nhd,hdc->nhc", x.float() - code.mean, derived.encoder)  # 0 at dropped components
    rms = ((unit * unit).sum(-1) / derived.kept).sqrt()
    scale_codes = scale_to_code(rms)
    ratio = unit / (derived.steps * code_to_scale(scale_codes).unsqueeze(-1))
    levels = derived.levels
    codes = torch.minimum(torch.clamp(torch.floor(ratio) + levels / 2, min=0), levels - 1)  # 0 where dropped
    return pack_codes(codes.to(torch.int32), code.layout), scale_codes


def decode_vectors(code: TransformCode, packed: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
    """Packed codes and per-token scale codes -> (tokens, H, d) float32 reconstruction."""
    derived = _derived(code)
    centred = unpack_codes(packed, code.layout).float() - derived.offsets  # 0 at dropped components
    unit_out = torch.einsum("nhc,hcd->nhd", centred, derived.decoder)
    return torch.addcmul(code.out_mean, unit_out, code_to_scale(scale_codes).unsqueeze(-1))


def flat_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Tokens `rows` (flat indices into batch*seq) of a (..., batch, heads, seq, dim) tensor, as (..., rows, heads,
    dim); gathers the rows alone, never copying the whole tensor."""
    seq = x.shape[-2]
    return x.transpose(-3, -2)[..., rows // seq, rows % seq, :, :]


def scatter_rows(out: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
    """Write (..., rows, H, d) into tokens `rows` (flat into batch*seq) of `out` (..., batch, H, seq, d), in place."""
    seq = out.shape[-2]
    out.transpose(-3, -2)[..., rows // seq, rows % seq, :, :] = x.to(out.dtype)


def content_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys (..., rows, H, d) of tokens `rows`, de-rotated with their (cos, sin) (batch*seq, d): float32."""
    return remove_rotary(keys.float(), cos[rows, None].float(), sin[rows, None].float())


def rotated_keys(content: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Content keys (..., rows, H, d) rotated with the (cos, sin) (batch*seq, d) of tokens `rows`: float32."""
    return apply_rotary(content.float(), cos[rows, None].float(), sin[rows, None].float())


def encode_rows(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
) -> list[RowCodes]:
    """Code tokens `rows` (flat indices into batch*seq) of several layers' post-RoPE keys and values (batch, H, seq,
    d), each with its (key, value) coders.

    Keys are de-rotated with the exact (cos, sin) (batch*seq, d) they were rotated with. Per layer: key codes, key
    scale codes, value codes, value scale codes.
    """
    return [
        (
            *encode_vectors(key_code, content_keys(flat_rows(k, rows), cos, sin, rows)),
            *encode_vectors(value_code, flat_rows(v, rows)),
        )
        for k, v, (key_code, value_code) in zip(keys, values, coders, strict=True)
    ]


def decode_rows(
    codes: Sequence[LayerCodes],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
    out_keys: Sequence[torch.Tensor],
    out_values: Sequence[torch.Tensor],
) -> None:
    """Decode several layers' coded tokens into rows `rows` of their `out_keys`/`out_values` (batch, H, seq, d);
    keys re-rotated with the consumer's (cos, sin) (batch*seq, d)."""
    for layer, (key_code, value_code), out_k, out_v in zip(codes, coders, out_keys, out_values, strict=True):
        keys = decode_vectors(key_code, layer.key_codes, layer.key_scales)
        scatter_rows(out_k, rows, rotated_keys(keys, cos, sin, rows))
        scatter_rows(out_v, rows, decode_vectors(value_code, layer.value_codes, layer.value_scales))
