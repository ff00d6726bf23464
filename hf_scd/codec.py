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
    """Inverse of `pack_codes`: (tokens, bytes) uint8 -> (tokens, heads, dim) int32 codes (0 where 0 bits)."""
    byte, shift = (t.to(packed.device) for t in layout.offsets)
    bits = layout.bits.to(packed.device).int()
    padded = torch.nn.functional.pad(packed.to(torch.int32), (0, 2))
    flat = byte.reshape(-1).long()
    word = padded[:, flat] | (padded[:, flat + 1] << 8)
    return (word.reshape(packed.shape[0], *bits.shape) >> shift) & ((1 << bits) - 1)


def encode_vectors(code: TransformCode, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, H, d) -> packed codes (tokens, bytes) uint8 and per-token scale codes (tokens, H) uint8."""
    bits = code.bits.float()
    kept = bits > 0
    unit = torch.einsum("nhd,hdc->nhc", x.float() - code.mean, code.encoder)
    rms = ((unit * unit * kept).sum(-1) / kept.sum(-1).clamp(min=1)).sqrt()
    scale_codes = scale_to_code(rms)
    levels = torch.exp2(bits)
    step = code.component_steps() * code_to_scale(scale_codes).unsqueeze(-1)
    ratio = unit / torch.where(kept, step, 1.0)
    codes = torch.minimum(torch.clamp(torch.floor(ratio) + levels / 2, min=0), levels - 1)
    codes = torch.where(kept, codes, 0.0).to(torch.int32)
    return pack_codes(codes, code.layout), scale_codes


def decode_vectors(code: TransformCode, packed: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
    """Packed codes and per-token scale codes -> (tokens, H, d) float32 reconstruction."""
    bits = code.bits.float()
    codes = unpack_codes(packed, code.layout).float()
    step = code.component_steps() * code_to_scale(scale_codes).unsqueeze(-1)
    unit = torch.where(bits > 0, (codes - torch.exp2(bits) / 2 + 0.5) * step, 0.0)
    return torch.einsum("nhc,hcd->nhd", unit, code.decoder) + code.out_mean


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
