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
file is their reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property

import torch

MAX_BITS = 8
# Per-token scales are shipped as uint8 codes of log2(rms) in steps of 1/SCALE_CODE_STEPS octave.
SCALE_CODE_STEPS = 16
SCALE_CODE_ZERO = 128


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the Llama family applies it; x is (..., seq, head_dim), cos/sin broadcast against it."""
    return x * cos + rotate_half(x) * sin


def remove_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `apply_rotary`, also when cos/sin carry an attention scaling factor (YaRN, LongRoPE)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def scale_to_code(rms: torch.Tensor) -> torch.Tensor:
    """Per-token RMS -> uint8 log code (1/16-octave steps, 2^-8 .. 2^8)."""
    code = torch.floor(torch.log2(rms.clamp(min=2.0**-8)) * SCALE_CODE_STEPS + 0.5) + SCALE_CODE_ZERO
    return code.clamp(0, 255).to(torch.uint8)


def code_to_scale(code: torch.Tensor) -> torch.Tensor:
    return torch.exp2((code.float() - SCALE_CODE_ZERO) / SCALE_CODE_STEPS)


@dataclass(frozen=True)
class BitLayout:
    """Where each component's bits sit in a token's packed codes, for one bit allocation (heads, dim).

    Each head's components are laid out in order, least significant bit first, and each head's run is padded to
    a whole byte, so a component's code (at most 8 bits) spans at most two bytes and heads never share a byte.
    """

    bits: torch.Tensor  # (heads, dim) uint8

    @cached_property
    def head_bytes(self) -> torch.Tensor:
        """(heads,) int64 bytes of each head's run, padded to a whole byte."""
        return (self.bits.long().sum(-1) + 7) // 8

    @cached_property
    def head_start(self) -> torch.Tensor:
        """(heads,) int64 each head's first byte within a token's packed codes."""
        return torch.cumsum(self.head_bytes, 0) - self.head_bytes

    @cached_property
    def offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(byte, shift) of every component's first bit within a token's packed codes, each (heads, dim) int32.

        Components with 0 bits point at their head's first byte with shift 0, so every offset stays in range.
        """
        bits = self.bits.long()
        start_in_head = torch.where(bits > 0, torch.cumsum(bits, -1) - bits, 0)
        byte = self.head_start.unsqueeze(-1) + start_in_head // 8
        return byte.to(torch.int32), (start_in_head % 8).to(torch.int32)

    @property
    def bytes_per_token(self) -> int:
        return int(self.head_bytes.sum())


def pack_codes(codes: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """(tokens, heads, dim) integer codes (0 where 0 bits) -> (tokens, bytes_per_token) uint8."""
    byte, shift = (t.to(codes.device).reshape(-1).long() for t in layout.offsets)
    shifted = codes.reshape(codes.shape[0], -1).to(torch.int32) << shift.to(torch.int32)
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
    return (word.reshape(-1, *bits.shape) >> shift) & ((1 << bits) - 1)


@dataclass
class TransformCode:
    """Calibrated transform coder of one layer's keys or values (all KV heads), at one bit allocation.

    mean (H, d); encoder (H, d, C) maps a centred vector to C unit-spread coefficients, most important first;
    decoder (H, C, d) maps coefficients back; steps (MAX_BITS + 1,) the quantizer step per bit width for a unit
    coefficient of a unit-RMS token; bits (H, C) the plan's bits per component. out_mean (H, d) is added back after
    decoding: the same as `mean` when a model codes its own cache, the consumer's mean when the decoder predicts
    another model's vectors (cross-variant Reuse).
    """

    mean: torch.Tensor
    encoder: torch.Tensor
    decoder: torch.Tensor
    steps: torch.Tensor
    bits: torch.Tensor
    out_mean: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.out_mean is None:
            self.out_mean = self.mean

    @cached_property
    def layout(self) -> BitLayout:
        return BitLayout(self.bits.to(torch.uint8).cpu())

    def to(self, device: torch.device) -> TransformCode:
        return TransformCode(*(getattr(self, f.name).to(device) for f in fields(self)))

    def component_steps(self) -> torch.Tensor:
        """Quantizer step (H, C) of every component for a unit-RMS token; 0 where the component gets 0 bits."""
        return self.steps.float()[self.bits.long()]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, H, d) -> packed codes (tokens, bytes) uint8 and per-token scale codes (tokens, H) uint8."""
        bits = self.bits.float()
        kept = bits > 0
        unit = torch.einsum("nhd,hdc->nhc", x.float() - self.mean, self.encoder)
        rms = ((unit * unit * kept).sum(-1) / kept.sum(-1).clamp(min=1)).sqrt()
        scale_codes = scale_to_code(rms)
        levels = torch.exp2(bits)
        step = self.component_steps() * code_to_scale(scale_codes).unsqueeze(-1)
        ratio = unit / torch.where(kept, step, 1.0)
        codes = torch.minimum(torch.clamp(torch.floor(ratio) + levels / 2, min=0), levels - 1)
        codes = torch.where(kept, codes, 0.0).to(torch.int32)
        return pack_codes(codes, self.layout), scale_codes

    def decode(self, packed: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
        """Packed codes and per-token scale codes -> (tokens, H, d) float32 reconstruction."""
        bits = self.bits.float()
        codes = unpack_codes(packed, self.layout).float()
        step = self.component_steps() * code_to_scale(scale_codes).unsqueeze(-1)
        unit = torch.where(bits > 0, (codes - torch.exp2(bits) / 2 + 0.5) * step, 0.0)
        return torch.einsum("nhc,hcd->nhd", unit, self.decoder) + self.out_mean

    def bytes_per_token(self) -> int:
        """Bytes of packed codes and scale codes this coder emits per token."""
        return self.layout.bytes_per_token + self.bits.shape[0]


@dataclass
class LayerCodes:
    """What one layer puts on the wire: codes and scale codes for K and V, and the exact (sink) tokens in bf16.

    A Patch layer of a cross-variant plan ships, instead of K/V codes, codes of the producer's normalised attention
    input (`hidden_*`); its K/V codes are then zero-width. Other layers' hidden codes are zero-width.
    """

    key_codes: torch.Tensor  # (coded tokens, key bytes) uint8
    key_scales: torch.Tensor  # (coded tokens, H) uint8
    value_codes: torch.Tensor
    value_scales: torch.Tensor
    exact_keys: torch.Tensor  # (exact tokens, H, d) bf16, de-rotated
    exact_values: torch.Tensor
    hidden_codes: torch.Tensor  # (coded tokens, hidden bytes) uint8
    hidden_scales: torch.Tensor  # (coded tokens, 1 or 0) uint8

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


CoderPair = tuple[TransformCode, TransformCode]
RowCodes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


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
        (*key_code.encode(content_keys(flat_rows(k, rows), cos, sin, rows)), *value_code.encode(flat_rows(v, rows)))
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
        keys = key_code.decode(layer.key_codes, layer.key_scales)
        scatter_rows(out_k, rows, rotated_keys(keys, cos, sin, rows))
        scatter_rows(out_v, rows, value_code.decode(layer.value_codes, layer.value_scales))


def _row_coder(reference, x: torch.Tensor):
    """The Triton kernel standing in for `reference` (`encode_rows` / `decode_rows`) on CUDA tensors, else itself."""
    if x.is_cuda:
        from . import kernels

        if kernels.available():
            return getattr(kernels, reference.__name__)
    return reference


def encode_layers(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    coded_rows: torch.Tensor,
    exact_rows: torch.Tensor,
    coders: Sequence[CoderPair],
) -> list[LayerCodes]:
    """Layers' caches (batch, H, seq, d), rotary (batch*seq, d) -> per layer, codes of `coded_rows` and bf16
    `exact_rows`.

    Row indices are flat into batch*seq; padding is in neither. All layers are coded together: on CUDA tensors that
    is one Triton launch for all keys and one for all values.
    """
    if not keys:
        return []
    coded = _row_coder(encode_rows, keys[0])(keys, values, cos, sin, coded_rows, coders)
    exact_keys = content_keys(torch.stack([flat_rows(k, exact_rows) for k in keys]), cos, sin, exact_rows)
    exact_values = torch.stack([flat_rows(v, exact_rows) for v in values])
    exact_keys, exact_values = exact_keys.to(torch.bfloat16), exact_values.to(torch.bfloat16)
    no_hidden = torch.empty(coded_rows.numel(), 0, dtype=torch.uint8, device=keys[0].device)
    return [
        LayerCodes(*layer, k, v, no_hidden, no_hidden)
        for layer, k, v in zip(coded, exact_keys, exact_values, strict=True)
    ]


def decode_layers(
    codes: Sequence[LayerCodes],
    cos: torch.Tensor,
    sin: torch.Tensor,
    coded_rows: torch.Tensor,
    exact_rows: torch.Tensor,
    coders: Sequence[CoderPair],
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Layers' codes -> per layer, keys and values (batch, H, seq, d) in `dtype`, keys re-rotated with the given
    (cos, sin).

    `shape` is (batch, seq). Padding rows come back as zeros: attention masks them anyway. All layers are decoded
    together, into one allocation: on CUDA tensors one Triton launch for all keys and one for all values.
    """
    if not codes:
        return []
    batch, seq = shape
    heads, _, dim = coders[0][0].decoder.shape
    device = codes[0].key_codes.device
    covered = coded_rows.numel() + exact_rows.numel() == batch * seq
    out = (torch.empty if covered else torch.zeros)(2, len(codes), batch, heads, seq, dim, dtype=dtype, device=device)
    keys, values = out.unbind(0)
    _row_coder(decode_rows, keys)(codes, cos, sin, coded_rows, coders, keys.unbind(0), values.unbind(0))
    if exact_rows.numel():
        exact_keys = torch.stack([layer.exact_keys for layer in codes])
        scatter_rows(keys, exact_rows, rotated_keys(exact_keys, cos, sin, exact_rows))
        scatter_rows(values, exact_rows, torch.stack([layer.exact_values for layer in codes]))
    return list(zip(keys.unbind(0), values.unbind(0), strict=True))
