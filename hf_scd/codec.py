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
    those past bit 8 belong to byte j + 1."""
    words = torch.bmm(codes, _pack_matrix(layout, codes.device)).to(torch.int32)
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


def _unpack_rows(packed: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """(tokens, bytes) uint8 -> (heads * dim, tokens) int32 codes: one row per component, gathered as whole rows."""
    byte, shift, mask = _unpack_tables(layout, packed.device)
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


def _unpack_tables(layout: BitLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each component's first byte (int64), its shift and its bit mask as columns (int32); made once per layout."""
    tables = layout.__dict__.setdefault("_unpack_tables", {})
    if device not in tables:
        byte, shift = (t.reshape(-1).to(device) for t in layout.offsets)
        mask = (1 << layout.bits.reshape(-1).to(device, torch.int32)) - 1
        tables[device] = (byte.long(), shift.unsqueeze(-1), mask.unsqueeze(-1))
    return tables[device]


@dataclass(frozen=True)
class _Derived:
    """What coding with one `TransformCode` needs besides its inputs, computed once per coder and shaped to broadcast
    against head-major (H, tokens, ...) tensors: the encoder with the dropped components' columns zeroed, the mean
    (H, 1, d), kept components per head (H, 1), quantizer steps (1 where dropped, so 0 / 1 codes them 0), half the
    levels and the top code (H, 1, C), the decoder with each component's step folded in (zero rows where dropped), the
    mid offset of each code as a column (H * C, 1), and the output mean (H, 1, d)."""

    encoder: torch.Tensor
    mean: torch.Tensor
    kept: torch.Tensor
    steps: torch.Tensor
    half_levels: torch.Tensor
    top: torch.Tensor
    decoder: torch.Tensor
    offsets: torch.Tensor
    out_mean: torch.Tensor


def _derived(code: TransformCode) -> _Derived:
    derived = code.__dict__.get("_derived")
    if derived is None:
        bits = code.bits.float()
        kept = bits > 0
        steps = code.component_steps()
        levels = torch.exp2(bits)
        derived = _Derived(
            encoder=code.encoder * kept.unsqueeze(1),
            mean=code.mean.unsqueeze(1),
            kept=kept.sum(-1).clamp(min=1).float().unsqueeze(-1),
            steps=torch.where(kept, steps, 1.0).unsqueeze(1),
            half_levels=(levels / 2).unsqueeze(1),
            top=(levels - 1).unsqueeze(1),
            decoder=code.decoder * steps.unsqueeze(-1),
            offsets=torch.where(kept, levels / 2 - 0.5, 0.0).reshape(-1, 1),
            out_mean=code.out_mean.unsqueeze(1),
        )
        code.__dict__["_derived"] = derived
    return derived


def _encode_heads(code: TransformCode, centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred head-major vectors (H, tokens, d) float32 -> packed codes (tokens, bytes) uint8 and per-token scale
    codes (tokens, H) uint8. Works in place on one (H, tokens, C) buffer."""
    derived = _derived(code)
    unit = torch.bmm(centred, derived.encoder)  # 0 at dropped components
    rms = ((unit * unit).sum(-1) / derived.kept).sqrt()
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
    heads, components = code.bits.shape
    centred = _unpack_rows(packed, code.layout).float().sub_(derived.offsets)  # 0 at dropped components
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
    scale codes, value codes, value scale codes. The tokens' rotary is gathered once for all layers; each layer's
    tokens are read as slices of its cache (`token_runs`) into one head-major buffer per kind.
    """
    if not keys:
        return []
    _, heads, seq, dim = keys[0].shape
    runs = token_runs(rows, seq)
    cos, sin = cos[rows].float(), sin[rows].float()
    squared = cos * cos + sin * sin
    encoded = []
    for k, v, (key_code, value_code) in zip(keys, values, coders, strict=True):
        content = torch.empty(heads, rows.numel(), dim, device=k.device)
        centred_values = torch.empty_like(content)
        for batch, start, end, first in runs:
            tokens = slice(first, first + end - start)
            _rotate_into(content[:, tokens], k[batch, :, start:end], cos[tokens], sin[tokens], inverse=True)
            torch.sub(v[batch, :, start:end], _derived(value_code).mean, out=centred_values[:, tokens])
        content /= squared  # `remove_rotary`, exact also under an attention scaling
        content -= _derived(key_code).mean
        encoded.append((*_encode_heads(key_code, content), *_encode_heads(value_code, centred_values)))
    return encoded


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
    keys re-rotated with the consumer's (cos, sin) (batch*seq, d). The last op on each layer's values, and the
    rotation of its keys, write straight into slices of the outputs (`token_runs`)."""
    if not codes:
        return
    runs = token_runs(rows, out_keys[0].shape[-2])
    cos, sin = cos[rows].float(), sin[rows].float()
    for layer, (key_code, value_code), out_k, out_v in zip(codes, coders, out_keys, out_values, strict=True):
        unit, scale = _decode_heads(key_code, layer.key_codes, layer.key_scales)
        content = torch.addcmul(_derived(key_code).out_mean, unit, scale, out=unit)
        unit, scale = _decode_heads(value_code, layer.value_codes, layer.value_scales)
        for batch, start, end, first in runs:
            tokens = slice(first, first + end - start)
            _rotate_into(out_k[batch, :, start:end], content[:, tokens], cos[tokens], sin[tokens], inverse=False)
            torch.addcmul(
                _derived(value_code).out_mean, unit[:, tokens], scale[:, tokens], out=out_v[batch, :, start:end]
            )
