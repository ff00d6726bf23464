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

The products by the encoder and decoder run in float32 (the reference numerics) or, on CPUs that multiply bf16
natively, in bf16 (`products`, chosen by `backend`): centring happens before the cast and everything after the
product runs in float32, so the only added error is bf16's rounding of each input and coefficient (2^-9 relative).

Kernels in `hf_scd/kernels/` implement `encode_rows` / `decode_rows` (all units of a cache at once) for CUDA tensors:
fused passes for units of one layer coded per head, and batched products between small kernels for units of any one
shape (joint units); this file is their reference and never imports them (`backend.py` chooses between the two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property

import torch

from .codes import BitLayout, CoderPair, LayerCodes, RowCodes, TransformCode, code_to_scale, scale_to_code


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the Llama family applies it, x * cos + rotate_half(x) * sin; x is (..., seq, head_dim), cos/sin
    broadcast against it."""
    dtype = torch.promote_types(x.dtype, cos.dtype)
    return rotate(x, *rotary_coefficients(cos.to(dtype), sin.to(dtype), inverse=False))


def remove_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `apply_rotary`, also when cos/sin carry an attention scaling factor (YaRN, LongRoPE)."""
    dtype = torch.promote_types(x.dtype, cos.dtype)
    return rotate(x, *rotary_coefficients(cos.to(dtype), sin.to(dtype), inverse=True))


def rotary_coefficients(cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (or with `inverse` its exact inverse, any attention scaling divided out) as `rotate`'s two coefficients:
    x * cos + rotate_half(x) * sin is x * cos + swap_halves(x) * (-sin | sin) (the halves of x swapped), and its
    inverse x * cos / r + swap_halves(x) * (sin | -sin) / r with r = cos^2 + sin^2. Made once per tensor of tokens,
    so coding a layer takes one product and two multiply-adds over its whole (H, tokens, d) block."""
    half = cos.shape[-1] // 2
    sign = torch.ones(cos.shape[-1], dtype=cos.dtype, device=cos.device)
    if not inverse:
        sign[:half] = -1
        return cos, sin * sign
    sign[half:] = -1
    squared = cos * cos + sin * sin
    return cos / squared, sin * sign / squared


def rotate(
    x: torch.Tensor, straight: torch.Tensor, swapped: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x * straight + swap_halves(x) * swapped (`rotary_coefficients`), in the dtype x and the coefficients promote
    to, or into `out`; x (..., tokens, d) against coefficients (tokens, d), or any shapes that broadcast. Half by
    half for the swapped term, so no swapped copy of x is made; an `out` of another dtype is written once, from the
    finished result, so it is rounded once."""
    dtype = torch.promote_types(x.dtype, straight.dtype)
    direct = out is not None and out.dtype == dtype
    result = torch.mul(x, straight, out=out if direct else None)
    half = x.shape[-1] // 2
    result[..., :half].addcmul_(x[..., half:], swapped[..., :half])
    result[..., half:].addcmul_(x[..., :half], swapped[..., half:])
    if out is None or direct:
        return result
    return out.copy_(result)


def pack_codes(codes: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """(tokens, heads, dim) integer codes (0 where 0 bits) -> (tokens, bytes_per_token) uint8."""
    return _pack_heads(codes.transpose(0, 1).float(), layout)


# Components packed by one product in `_pack_heads`: their codes start in a window of at most PACK_CHUNK bytes, so the
# products are banded instead of as wide as a head's bytes (a joint unit's block is 960 components wide for SmolLM2).
PACK_CHUNK = 32


def _pack_heads(codes: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """Head-major codes (H, tokens, dim), whole numbers in float32 -> (tokens, bytes_per_token) uint8.

    The components are taken PACK_CHUNK at a time (all at once where the count is not a multiple): one float32
    product per chunk by a one-hot matrix adds code * 2^shift into a word for the byte where each code starts, in a
    window of bytes from the chunk's first code. Those are whole numbers below 2^16 with at most 8 significant bits
    per term, so the sums are exact whatever the order of the additions or the precision the product runs in (bf16 or
    TF32 included). The windows are added into the token's words, and each byte is its word's low 8 bits OR the bits
    that overflowed the byte before (bits of different components never overlap). `codes` may stop after the last
    kept component (`_Derived.components`)."""
    tables = _pack_tables(layout, codes.device, codes.shape[-1])
    heads, tokens, components = codes.shape
    chunks = codes.view(heads, tokens, components // tables.chunk, tables.chunk).transpose(1, 2)
    windows = torch.matmul(chunks, tables.matrix).flatten(0, 1)  # (heads * chunks, tokens, span)
    span, width = windows.shape[-1], layout.bytes_per_token
    words = torch.zeros(tokens, width + span, device=codes.device)
    for window, start in zip(windows, tables.starts, strict=True):
        words[:, start : start + span] += window
    words = words[:, :width].to(torch.int32)
    packed = words & 255
    packed[:, 1:] |= words[:, :-1] >> 8
    return packed.to(torch.uint8)


@dataclass(frozen=True)
class _PackTables:
    """`_pack_heads`' tables for the first `components` of each head, taken `chunk` at a time: per chunk (all heads'
    in order) the first byte of its window, and the one-hot float32 matrix (H, chunks per head, chunk, span) of
    2^shift taking each code to its byte in the window."""

    chunk: int
    starts: list[int]
    matrix: torch.Tensor


def _pack_tables(layout: BitLayout, device: torch.device, components: int) -> _PackTables:
    """Made once per layout, device and component count."""
    tables = layout.__dict__.setdefault("_pack_tables", {})
    if (device, components) not in tables:
        chunk = PACK_CHUNK if components % PACK_CHUNK == 0 else max(components, 1)
        byte, shift = (t[:, :components].long().reshape(-1, chunk) for t in layout.offsets)
        kept = layout.bits[:, :components].reshape(-1, chunk) > 0
        # A chunk's window starts at its first kept code's byte (dropped components point at their head's first).
        starts = torch.where(kept, byte, byte.amax(-1, keepdim=True)).amin(-1)
        in_window = torch.where(kept, byte - starts.unsqueeze(-1), 0)
        span = int(in_window.max()) + 1 if in_window.numel() else 1
        matrix = torch.zeros(*byte.shape, span)
        matrix.scatter_(-1, in_window.unsqueeze(-1), torch.where(kept, torch.exp2(shift.float()), 0.0).unsqueeze(-1))
        matrix = matrix.view(layout.bits.shape[0], -1, chunk, span)
        tables[(device, components)] = _PackTables(chunk, starts.tolist(), matrix.to(device))
    return tables[(device, components)]


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
    against block-major (G, tokens, ...) tensors. Every per-component part stops after the last component any block
    keeps, rounded up to whole chunks of `PACK_CHUNK` where the block is that wide (`components`): past it all get 0
    bits, so neither product spends time on them. The encoder with the dropped components' columns zeroed, the mean (G,
    1, W), the square root of the kept components per block (G, 1), quantizer steps (1 where dropped, so 0 / 1 codes
    them 0), half the levels and the top code (G, 1, C), the decoder with each component's step folded in (zero rows
    where dropped), the mid offset of each code as a column (G * C, 1), the output mean (G, 1, W), and the peak limits
    of the components up to the last with PEAK_BITS bits (G, 1, P), or None when none has."""

    encoder: torch.Tensor
    mean: torch.Tensor
    root_kept: torch.Tensor
    steps: torch.Tensor
    half_levels: torch.Tensor
    top: torch.Tensor
    decoder: torch.Tensor
    offsets: torch.Tensor
    out_mean: torch.Tensor
    peak: torch.Tensor | None
    components: int

    def matrices(self, products: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder, decoder) in the dtype the products run in, converted once."""
        converted = self.__dict__.setdefault("_converted", {})
        if products not in converted:
            converted[products] = (self.encoder.to(products), self.decoder.to(products))
        return converted[products]


def _derived(code: TransformCode) -> _Derived:
    derived = code.__dict__.get("_derived")
    if derived is None:
        kept_any = (code.bits > 0).any(0)
        last = int(kept_any.nonzero().max()) + 1 if bool(kept_any.any()) else 1
        # Rounded up to whole chunks of the packing's products, where the block is that wide
        components = min(-(-last // PACK_CHUNK) * PACK_CHUNK, code.bits.shape[-1])
        bits = code.bits[:, :components].float()
        kept = bits > 0
        steps = code.component_steps()[:, :components]
        levels = torch.exp2(bits)
        peak = code.peak_limits()[:, :components]
        peaked = (peak > 0).any(0)
        derived = _Derived(
            encoder=code.encoder[..., :components] * kept.unsqueeze(1),
            mean=code.mean.unsqueeze(1),
            root_kept=kept.sum(-1).clamp(min=1).float().sqrt().unsqueeze(-1),
            steps=torch.where(kept, steps, 1.0).unsqueeze(1),
            half_levels=(levels / 2).unsqueeze(1),
            top=(levels - 1).unsqueeze(1),
            decoder=code.decoder[:, :components] * steps.unsqueeze(-1),
            offsets=torch.where(kept, levels / 2 - 0.5, 0.0).reshape(-1, 1),
            out_mean=code.out_mean.unsqueeze(1),
            peak=peak[:, : int(peaked.nonzero().max()) + 1].unsqueeze(1) if bool(peaked.any()) else None,
            components=components,
        )
        code.__dict__["_derived"] = derived
    return derived


def _encode_heads(
    code: TransformCode, centred: torch.Tensor, products: torch.dtype = torch.float32, packed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred block-major vectors (G, tokens, W), in the `products` dtype -> packed codes (tokens, bytes) uint8, or
    with `packed=False` the rows the decoder reads (G, C, tokens) uint8 (`UnpackedLayerCodes`), and per-token scale
    codes (tokens, G) uint8. The product runs in `products`; everything after it in float32, in place on one (G,
    tokens, C) buffer."""
    derived = _derived(code)
    encoder, _ = derived.matrices(products)
    unit = torch.bmm(centred, encoder).float()  # 0 at dropped components
    rms = torch.linalg.vector_norm(unit, dim=-1).div_(derived.root_kept)
    if derived.peak is not None:
        peaked = unit[..., : derived.peak.shape[-1]]
        rms = torch.maximum(rms, torch.mul(peaked.abs(), derived.peak).amax(-1))
    scale_codes = scale_to_code(rms)
    steps = derived.steps * code_to_scale(scale_codes).unsqueeze(-1)
    codes = unit.div_(steps).floor_().add_(derived.half_levels).clamp_(min=0)
    torch.minimum(codes, derived.top, out=codes)  # 0 where dropped
    held = _pack_heads(codes, code.layout) if packed else codes.to(torch.uint8).transpose(1, 2)
    return held, scale_codes.T.contiguous()


def _decode_heads(
    code: TransformCode, rows: torch.Tensor, scale_codes: torch.Tensor, products: torch.dtype = torch.float32
) -> torch.Tensor:
    """Component rows (`unpacked_rows`) and per-token scale codes -> block-major reconstruction (G, tokens, W),
    `out_mean + unit * scale`, in the `products` dtype. Each code is centred and scaled by its token's scale before
    the product, so one batched multiply-add by the decoder, which has the steps folded in, gives the vectors."""
    derived = _derived(code)
    heads, components = code.bits.shape[0], derived.components
    offsets = derived.offsets.view(heads, components, 1)
    centred = rows[:, :components].float().sub_(offsets)  # 0 at dropped components
    scaled = centred.mul_(code_to_scale(scale_codes).T.unsqueeze(1)).transpose(1, 2)
    _, decoder = derived.matrices(products)
    return torch.baddbmm(
        derived.out_mean.to(products), scaled.to(products, memory_format=torch.contiguous_format), decoder
    )


def unpacked_rows(code: TransformCode, packed: torch.Tensor) -> torch.Tensor:
    """Packed codes (tokens, bytes) -> the rows the decoder reads: (heads, components, tokens) int32, each head's
    components in order up to the last any head keeps (at least)."""
    components = _derived(code).components
    return _unpack_rows(packed, code.layout, components).view(code.bits.shape[0], components, -1)


class UnpackedLayerCodes(LayerCodes):
    """A Reuse unit's last layer holding its K/V codes as the decoder reads them: one row per component, (heads,
    components, tokens) uint8 (0 where a component has no bits; each head's components in order, at least up to the
    last any head keeps). The entropy stage decompresses into these, and the CPU encoder makes them for a frame the
    stage codes next (`Plan.encode_layer(..., packed=False)`), so those codes are not packed and unpacked on the way.
    `key_codes` and `value_codes` are packed from the rows when something asks for them (a payload or frame written
    out, the GPU kernels)."""

    def __init__(self, layer: LayerCodes, coders: CoderPair, key_rows: torch.Tensor, value_rows: torch.Tensor):
        for part in fields(LayerCodes):
            if part.name not in _KV_CODES:
                setattr(self, part.name, getattr(layer, part.name))
        self.coders = coders
        self.rows = {"key": key_rows, "value": value_rows}

    @cached_property
    def key_codes(self) -> torch.Tensor:
        return pack_codes(self.rows["key"].permute(2, 0, 1), self.coders[0].layout)

    @cached_property
    def value_codes(self) -> torch.Tensor:
        return pack_codes(self.rows["value"].permute(2, 0, 1), self.coders[1].layout)

    def codes_shape(self, kind: str) -> tuple[int, int]:
        if kind not in self.rows:
            return super().codes_shape(kind)
        code = self.coders[0] if kind == "key" else self.coders[1]
        return self.rows[kind].shape[-1], code.layout.bytes_per_token

    def to(self, device: torch.device | str) -> UnpackedLayerCodes:
        rows = (self.rows[kind].to(device) for kind in ("key", "value"))
        return UnpackedLayerCodes(without_codes(self).to(device), self.coders, *rows)


_KV_CODES = ("key_codes", "value_codes")


def without_codes(layer: LayerCodes) -> LayerCodes:
    """The layer with zero-width K/V codes: what rides beside them where they travel apart (the entropy stage)."""
    empty = layer.key_scales[:, :0]
    return LayerCodes(
        **{part.name: empty if part.name in _KV_CODES else getattr(layer, part.name) for part in fields(LayerCodes)}
    )


def code_rows(layer: LayerCodes, kind: str, code: TransformCode) -> torch.Tensor:
    """A unit's `kind` ("key"/"value") codes in its last `layer` as the decoder reads them, (heads, components,
    tokens), each head's components in order up to the last any head keeps (at least): held so, or unpacked."""
    if isinstance(layer, UnpackedLayerCodes):
        return layer.rows[kind]
    return unpacked_rows(code, getattr(layer, f"{kind}_codes"))


def encode_vectors(code: TransformCode, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, H, d) -> packed codes (tokens, bytes) uint8 and per-token scale codes (tokens, H) uint8."""
    return _encode_heads(code, x.float().transpose(0, 1) - _derived(code).mean)


def decode_vectors(code: TransformCode, packed: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
    """Packed codes and per-token scale codes -> (tokens, H, d) float32 reconstruction."""
    return _decode_heads(code, unpacked_rows(code, packed), scale_codes).transpose(0, 1)


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
    products: torch.dtype = torch.float32,
    packed: bool = True,
) -> list[RowCodes]:
    """Code tokens `rows` (flat indices into batch*seq) of several Reuse units, each its member layers' post-RoPE
    keys and values (batch, H, seq, d), with the unit's (key, value) coders.

    Keys are de-rotated with the exact (cos, sin) (batch*seq, d) they were rotated with. Per unit: key codes, key
    scale codes, value codes, value scale codes; the codes packed (tokens, bytes), as the kernels give them, or with
    `packed=False` as the rows the decoder reads (blocks, components, tokens), for `UnpackedLayerCodes`: codes the
    entropy stage codes next are then never packed. The encoder products run in `products` (`backend` picks bf16 on
    CPUs that multiply it natively). Each layer's tokens are read as slices of its cache (`token_runs`), de-rotated
    and centred as whole (H, tokens, d) blocks, and written into one token-major buffer per unit and kind.
    """
    if not keys:
        return []
    _, heads, seq, dim = keys[0][0].shape
    runs = token_runs(rows, seq)
    derotation = rotary_coefficients(cos[rows].float(), sin[rows].float(), inverse=True)
    encoded = []
    for unit_keys, unit_values, (key_code, value_code) in zip(keys, values, coders, strict=True):
        key_blocks = _centred_unit(key_code, unit_keys, runs, rows.numel(), products, derotation)
        value_blocks = _centred_unit(value_code, unit_values, runs, rows.numel(), products)
        encoded.append(
            (
                *_encode_heads(key_code, key_blocks, products, packed),
                *_encode_heads(value_code, value_blocks, products, packed),
            )
        )
    return encoded


def _centred_unit(
    code: TransformCode,
    layers: Sequence[torch.Tensor],
    runs: list[tuple[int, int, int, int]],
    tokens: int,
    products: torch.dtype,
    derotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A unit's member layers (batch, H, seq, d), their `runs` of coded tokens de-rotated (keys: `derotation`'s
    coefficients) and centred in float32 -> the coder's blocks (G, tokens, W) in the `products` dtype."""
    heads, dim = layers[0].shape[1], layers[0].shape[3]
    mean = _derived(code).mean.reshape(len(layers), heads, 1, dim)
    unit = torch.empty(tokens, len(layers), heads, dim, dtype=products, device=layers[0].device)
    for member, layer in enumerate(layers):
        for batch, start, end, first in runs:
            span = slice(first, first + end - start)
            x = layer[batch, :, start:end]
            if derotation is None:
                centred = torch.sub(x, mean[member])
            else:
                centred = rotate(x, derotation[0][span], derotation[1][span]).sub_(mean[member])
            unit[span, member] = centred.transpose(0, 1)
    return blocks(code, unit)


def decode_rows(
    codes: Sequence[LayerCodes],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
    out_keys: Sequence[Sequence[torch.Tensor]],
    out_values: Sequence[Sequence[torch.Tensor]],
    products: torch.dtype = torch.float32,
) -> None:
    """Decode several Reuse units' coded tokens (each unit's codes as its last layer carries them) into rows `rows` of
    their member layers' `out_keys`/`out_values` (batch, H, seq, d); keys re-rotated with the consumer's (cos, sin)
    (batch*seq, d). The decoder products run in `products`. The rotation of the keys and the copy of the values
    write straight into slices of the outputs (`token_runs`)."""
    if not codes:
        return
    runs = token_runs(rows, out_keys[0][0].shape[-2])
    straight, swapped = rotary_coefficients(cos[rows].float(), sin[rows].float(), inverse=False)
    for unit_codes, (key_code, value_code), unit_keys, unit_values in zip(
        codes, coders, out_keys, out_values, strict=True
    ):
        _, heads, _, dim = unit_keys[0].shape
        shape = (rows.numel(), len(unit_keys), heads, dim)
        # Keys in float32 before they are rotated: torch's CPU multiply of a strided bf16 view is several times slower
        content = _decode_heads(key_code, code_rows(unit_codes, "key", key_code), unit_codes.key_scales, products)
        content = content.float()
        vectors = _decode_heads(
            value_code, code_rows(unit_codes, "value", value_code), unit_codes.value_scales, products
        )
        content, vectors = (part.transpose(0, 1).reshape(shape) for part in (content, vectors))
        for member, (out_k, out_v) in enumerate(zip(unit_keys, unit_values, strict=True)):
            for batch, start, end, first in runs:
                span = slice(first, first + end - start)
                rotate(
                    content[span, member].transpose(0, 1), straight[span], swapped[span], out=out_k[batch, :, start:end]
                )
                out_v[batch, :, start:end] = vectors[span, member].transpose(0, 1)
