"""The SCD math in plain torch: the reference implementation and the CPU path.

Keys (de-rotated: RoPE removed, so they live in a position-free content space) and values are transform-coded per
Reuse unit: one layer, or a run of consecutive layers coded together, whose KV heads side by side form one vector per
token. The vector is split into blocks (one per head, or one for the whole unit: a joint basis that decorrelates
heads and layers and lets one bit budget cover them), each centred and multiplied by a calibrated encoder matrix
whose columns give unit-spread coefficients in order of importance. Each token's coefficients are normalised by a
scale (their RMS, raised where it would clip a component of PEAK_BITS or more; shipped as an 8-bit log code),
quantized with the number of bits the plan gives each component (0 bits drops it), and packed. Decoding multiplies
the dequantized coefficients by the decoder matrix. Encoder and decoder are separate inputs, not one orthonormal
basis, so a weighted metric (keys weighted by query energy, values by the output projection) and a decoder fitted for
another model both fit the same code path.

The first few tokens of every row (the attention sink) are not coded: they carry most of the attention mass and
ship exactly, in bf16.

Kernels in `hf_scd/kernels/` implement `encode_rows` / `decode_rows` (all units of a cache at once) for CUDA tensors
and units of one layer coded per head; this file is their reference and never imports them (`backend.py` chooses
between the two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .codes import BitLayout, CoderPair, LayerCodes, RowCodes, TransformCode, code_to_scale, scale_to_code


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the Llama family applies it, x * cos + rotate_half(x) * sin; x is (..., seq, head_dim), cos/sin
    broadcast against it."""
    return _rotated(x, cos, sin, inverse=False)


def remove_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `apply_rotary`, also when cos/sin carry an attention scaling factor (YaRN, LongRoPE)."""
    return _rotated(x, cos, sin, inverse=True).div_(cos * cos + sin * sin)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    shape, dtype = torch.broadcast_shapes(x.shape, cos.shape), torch.promote_types(x.dtype, cos.dtype)
    out = torch.empty(shape, dtype=dtype, device=x.device)
    _rotate_into(out, x, cos, sin, inverse)
    return out


def pack_codes(codes: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """(tokens, heads, dim) integer codes (0 where 0 bits) -> (tokens, bytes_per_token) uint8."""
    return _pack_heads(codes.transpose(0, 1).float(), layout)


def _pack_heads(codes: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """Head-major codes (H, tokens, dim), whole numbers in float32 -> (tokens, bytes_per_token) uint8.

    Shifting each code to its bit offset and OR-ing the codes that start in one byte is one matmul per head: bits of
    different components never overlap, so OR is addition, and every sum is a whole number below 2^16, exact in
    float32 whatever the order of the additions. Column j of a head's words holds the bits that start in its byte j;
    those past bit 8 belong to byte j + 1. `codes` may stop after the last kept component (`_Derived.components`)."""
    words = torch.bmm(codes, _pack_matrix(layout, codes.device)[:, : codes.shape[-1]]).to(torch.int32)
    packed = words & 0xFF
    packed[..., 1:] |= words[..., :-1] >> 8
    heads = [packed[head, :, :size] for head, size in enumerate(layout.head_bytes.tolist())]
    return torch.cat(heads, -1).to(torch.uint8) if heads else packed.new_empty(codes.shape[1], 0, dtype=torch.uint8)


def _pack_matrix(layout: BitLayout, device: torch.device) -> torch.Tensor:
    """(H, dim, widest head's bytes) float32: 2^shift where a kept component's first bit is in that byte of its
    head; made once per layout."""
    tables = layout.__dict__.setdefault("_pack_matrix", {})
    if device not in tables:
        byte, shift = layout.offsets
        heads, dim = layout.bits.shape
        in_head = (byte - layout.head_start.unsqueeze(-1)).long()
        width = int(layout.head_bytes.max()) if heads else 0
        matrix = torch.zeros(heads, dim, width + 1)  # a dropped component of an empty head points at byte 0 of none
        matrix.scatter_(
            -1, in_head.unsqueeze(-1), torch.where(layout.bits > 0, torch.exp2(shift.float()), 0.0)[..., None]
        )
        tables[device] = matrix[..., :width].to(device)
    return tables[device]


def unpack_codes(packed: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """Inverse of `pack_codes`: (tokens, bytes) uint8 -> (tokens, heads, dim) int32 codes (0 where 0 bits)."""
    heads, dim = layout.bits.shape
    return _unpack_rows(packed, layout).view(heads, dim, -1).permute(2, 0, 1)


def _unpack_rows(packed: torch.Tensor, layout: BitLayout, components: int | None = None) -> torch.Tensor:
    """(tokens, bytes) uint8 -> (heads * components, tokens) int32 codes of each head's first `components` (default
    all): one row per component, gathered as whole rows."""
    byte, shift, mask = _unpack_tables(layout, packed.device, components or layout.bits.shape[-1])
    tokens = packed.shape[0]
    # Row j of `words`: bytes j and j + 1 of every token as one 16-bit word (two spare rows of zeros at the end).
    rows = torch.zeros(layout.bytes_per_token + 2, tokens, dtype=torch.int32, device=packed.device)
    rows[:-2] = packed.T
    words = rows[:-1]
    words |= rows[1:] << 8
    codes = words.index_select(0, byte)
    codes >>= shift
    codes &= mask
    return codes


def _unpack_tables(
    layout: BitLayout, device: torch.device, components: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first `components` of each head: their first byte (int64), shift and bit mask as columns (int32); made
    once per layout."""
    tables = layout.__dict__.setdefault("_unpack_tables", {})
    if (device, components) not in tables:
        byte, shift = (t[:, :components].reshape(-1).to(device) for t in layout.offsets)
        mask = (1 << layout.bits[:, :components].reshape(-1).to(device, torch.int32)) - 1
        tables[(device, components)] = (byte.long(), shift.unsqueeze(-1), mask.unsqueeze(-1))
    return tables[(device, components)]


@dataclass(frozen=True)
class _Derived:
    """What coding with one `TransformCode` needs besides its inputs, computed once per coder and shaped to broadcast
    against head-major (H, tokens, ...) tensors. Every per-component part stops after the last component any head
    keeps (`components`): past it all get 0 bits, so neither product spends time on them. The encoder with the
    dropped components' columns zeroed, the mean
    (H, 1, d), kept components per head (H, 1), quantizer steps (1 where dropped, so 0 / 1 codes them 0), half the
    levels and the top code (H, 1, C), the decoder with each component's step folded in (zero rows where dropped), the
    mid offset of each code as a column (H * C, 1), the output mean (H, 1, d), and the peak limits (H, 1, C) or None
    when no component has PEAK_BITS bits."""

    encoder: torch.Tensor
    mean: torch.Tensor
    kept: torch.Tensor
    steps: torch.Tensor
    half_levels: torch.Tensor
    top: torch.Tensor
    decoder: torch.Tensor
    offsets: torch.Tensor
    out_mean: torch.Tensor
    peak: torch.Tensor | None
    components: int


def _derived(code: TransformCode) -> _Derived:
    derived = code.__dict__.get("_derived")
    if derived is None:
        kept_any = (code.bits > 0).any(0)
        components = int(kept_any.nonzero().max()) + 1 if bool(kept_any.any()) else 1
        bits = code.bits[:, :components].float()
        kept = bits > 0
        steps = code.component_steps()[:, :components]
        levels = torch.exp2(bits)
        peak = code.peak_limits()[:, :components]
        derived = _Derived(
            encoder=code.encoder[..., :components] * kept.unsqueeze(1),
            mean=code.mean.unsqueeze(1),
            kept=kept.sum(-1).clamp(min=1).float().unsqueeze(-1),
            steps=torch.where(kept, steps, 1.0).unsqueeze(1),
            half_levels=(levels / 2).unsqueeze(1),
            top=(levels - 1).unsqueeze(1),
            decoder=code.decoder[:, :components] * steps.unsqueeze(-1),
            offsets=torch.where(kept, levels / 2 - 0.5, 0.0).reshape(-1, 1),
            out_mean=code.out_mean.unsqueeze(1),
            peak=peak.unsqueeze(1) if bool((peak > 0).any()) else None,
            components=components,
        )
        code.__dict__["_derived"] = derived
    return derived


def _encode_heads(code: TransformCode, centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred block-major vectors (G, tokens, W) float32 -> packed codes (tokens, bytes) uint8 and per-token scale
    codes (tokens, G) uint8. Works in place on one (G, tokens, C) buffer."""
    derived = _derived(code)
    unit = torch.bmm(centred, derived.encoder)  # 0 at dropped components
    rms = ((unit * unit).sum(-1) / derived.kept).sqrt()
    if derived.peak is not None:
        rms = torch.maximum(rms, (unit.abs() * derived.peak).amax(-1))
    scale_codes = scale_to_code(rms)
    steps = derived.steps * code_to_scale(scale_codes).unsqueeze(-1)
    codes = torch.div(unit, steps, out=unit).floor_()
    codes += derived.half_levels
    codes.clamp_(min=0)
    torch.minimum(codes, derived.top, out=codes)  # 0 where dropped
    return _pack_heads(codes, code.layout), scale_codes.T.contiguous()


def _decode_heads(
    code: TransformCode, packed: torch.Tensor, scale_codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes and per-token scale codes -> head-major unit-RMS reconstruction (H, tokens, d) and the tokens'
    scales (H, tokens, 1), float32: the vectors are `out_mean + unit * scale`, written where they are wanted."""
    derived = _derived(code)
    heads, components = code.bits.shape[0], derived.components
    centred = _unpack_rows(packed, code.layout, components).float().sub_(derived.offsets)  # 0 at dropped components
    unit = torch.bmm(centred.view(heads, components, -1).transpose(1, 2), derived.decoder)
    return unit, code_to_scale(scale_codes).T.unsqueeze(-1)


def encode_vectors(code: TransformCode, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, H, d) -> packed codes (tokens, bytes) uint8 and per-token scale codes (tokens, H) uint8."""
    return _encode_heads(code, x.float().transpose(0, 1) - _derived(code).mean)


def decode_vectors(code: TransformCode, packed: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
    """Packed codes and per-token scale codes -> (tokens, H, d) float32 reconstruction."""
    unit, scale = _decode_heads(code, packed, scale_codes)
    return torch.addcmul(_derived(code).out_mean, unit, scale, out=unit).transpose(0, 1)


def token_runs(rows: torch.Tensor, seq: int) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive positions of one batch row among `rows` (flat indices into batch*seq), as (batch row,
    first position, end position, index of the run's first token in `rows`): the coded tokens of a row are one run
    (padding and sink come first), so they are read and written as slices of a (batch, H, seq, d) cache instead of
    being gathered and scattered token by token. Each run costs a few torch calls per layer."""
    if rows.numel() == 0:
        return []
    rows = rows.cpu()
    starts_run = torch.ones_like(rows, dtype=torch.bool)
    starts_run[1:] = (rows[1:] != rows[:-1] + 1) | (rows[1:] % seq == 0)
    firsts = starts_run.nonzero().squeeze(-1).tolist()
    ends = firsts[1:] + [rows.numel()]
    heads = rows[firsts].tolist()
    return [
        (row // seq, row % seq, row % seq + end - first, first)
        for row, first, end in zip(heads, firsts, ends, strict=True)
    ]


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """out = x * cos + rotate_half(x) * sin (with `inverse`, x * cos - rotate_half(x) * sin), half by half: the same
    float ops as concatenating rotate_half(x), each half rounded once into `out`, whatever its dtype."""
    half = x.shape[-1] // 2
    x1, x2, cos1, cos2, sin1, sin2 = x[..., :half], x[..., half:], *cos.split(half, -1), *sin.split(half, -1)
    first, second = (torch.add, torch.sub) if inverse else (torch.sub, torch.add)
    first(x1 * cos1, x2 * sin1, out=out[..., :half])
    second(x2 * cos2, x1 * sin2, out=out[..., half:])


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


def blocks(code: TransformCode, unit: torch.Tensor) -> torch.Tensor:
    """A unit's token-major vectors (tokens, layers, H, d) as the coder's blocks (G, tokens, W), a view."""
    return unit.view(unit.shape[0], *code.mean.shape).transpose(0, 1)


def encode_rows(
    keys: Sequence[Sequence[torch.Tensor]],
    values: Sequence[Sequence[torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
) -> list[RowCodes]:
    """Code tokens `rows` (flat indices into batch*seq) of several Reuse units, each its member layers' post-RoPE
    keys and values (batch, H, seq, d), with the unit's (key, value) coders.

    Keys are de-rotated with the exact (cos, sin) (batch*seq, d) they were rotated with. Per unit: key codes, key
    scale codes, value codes, value scale codes. The tokens' rotary is gathered once for all units; each layer's
    tokens are read as slices of its cache (`token_runs`) into one token-major buffer per unit and kind.
    """
    if not keys:
        return []
    _, heads, seq, dim = keys[0][0].shape
    runs = token_runs(rows, seq)
    cos, sin = cos[rows].float(), sin[rows].float()
    squared = (cos * cos + sin * sin)[:, None, None]  # broadcast over a unit's (tokens, layers, H, d)
    encoded = []
    for unit_keys, unit_values, (key_code, value_code) in zip(keys, values, coders, strict=True):
        content = torch.empty(rows.numel(), len(unit_keys), heads, dim, device=unit_keys[0].device)
        vectors = torch.empty_like(content)
        for member, (k, v) in enumerate(zip(unit_keys, unit_values, strict=True)):
            for batch, start, end, first in runs:
                tokens = slice(first, first + end - start)
                out = content[tokens, member].transpose(0, 1)
                _rotate_into(out, k[batch, :, start:end], cos[tokens], sin[tokens], inverse=True)
                vectors[tokens, member] = v[batch, :, start:end].transpose(0, 1)
        content /= squared  # `remove_rotary`, exact also under an attention scaling
        key_blocks = blocks(key_code, content) - _derived(key_code).mean
        value_blocks = blocks(value_code, vectors) - _derived(value_code).mean
        encoded.append((*_encode_heads(key_code, key_blocks), *_encode_heads(value_code, value_blocks)))
    return encoded


def _decoded_unit(code: TransformCode, packed: torch.Tensor, scale_codes: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A unit's packed codes -> its token-major vectors (tokens, layers, H, d) float32."""
    unit, scale = _decode_heads(code, packed, scale_codes)
    vectors = torch.addcmul(_derived(code).out_mean, unit, scale, out=unit)
    return vectors.transpose(0, 1).reshape(vectors.shape[1], *shape)


def decode_rows(
    codes: Sequence[LayerCodes],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
    out_keys: Sequence[Sequence[torch.Tensor]],
    out_values: Sequence[Sequence[torch.Tensor]],
) -> None:
    """Decode several Reuse units' coded tokens (each unit's codes as its last layer carries them) into rows `rows` of
    their member layers' `out_keys`/`out_values` (batch, H, seq, d); keys re-rotated with the consumer's (cos, sin)
    (batch*seq, d). The rotation of the keys and the copy of the values write straight into slices of the outputs
    (`token_runs`)."""
    if not codes:
        return
    runs = token_runs(rows, out_keys[0][0].shape[-2])
    cos, sin = cos[rows].float(), sin[rows].float()
    for unit_codes, (key_code, value_code), unit_keys, unit_values in zip(
        codes, coders, out_keys, out_values, strict=True
    ):
        _, heads, _, dim = unit_keys[0].shape
        shape = (len(unit_keys), heads, dim)
        content = _decoded_unit(key_code, unit_codes.key_codes, unit_codes.key_scales, shape)
        vectors = _decoded_unit(value_code, unit_codes.value_codes, unit_codes.value_scales, shape)
        for member, (out_k, out_v) in enumerate(zip(unit_keys, unit_values, strict=True)):
            for batch, start, end, first in runs:
                tokens = slice(first, first + end - start)
                member_content = content[tokens, member].transpose(0, 1)
                _rotate_into(out_k[batch, :, start:end], member_content, cos[tokens], sin[tokens], inverse=False)
                out_v[batch, :, start:end] = vectors[tokens, member].transpose(0, 1)
