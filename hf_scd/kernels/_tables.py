"""Host-side tables the kernels read: the TransformCodes of several layers, stacked as small contiguous tensors.

One launch codes or decodes every layer of a cache, so its tables hold all the layers' matrices and bit layouts
side by side, indexed by (layer, head) for the fused kernels (`CodeTables`) and by (unit, block) for the block path
(`BlockTables`). They are built once per (sequence of TransformCodes, device) and cached, so
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


_CACHE: dict[tuple[str, tuple[int, ...], str], tuple[tuple, CodeTables | BlockTables]] = {}


def _stamp(codes: Sequence[TransformCode]) -> tuple:
    return tuple(
        (id(t), t.data_ptr(), t._version) for code in codes for t in (getattr(code, f.name) for f in fields(code))
    )


def _whole_chunks(longest: int) -> int:
    """The longest head's (block's) packed bytes, rounded up to whole BYTE_CHUNKs: at least one."""
    return max(1, -(-longest // BYTE_CHUNK)) * BYTE_CHUNK


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
    bytes_pad = _whole_chunks(int(stacked["head_bytes"].max()) if heads else 1)
    stacked["byte_count"] = (stacked["byte_rel"][..., None] == torch.arange(bytes_pad)).sum(-2)
    for name in ("encoder", "decoder"):  # (L, pieces, ...) -> (pieces, L, ...): one piece stride for all layers
        stacked[name] = stacked[name].movedim(1, 0)
    ints = ("byte_rel", "shift", "bits", "head_start", "head_col", "head_bytes", "byte_count")
    return CodeTables(
        layers=len(codes),
        heads=heads,
        dim=dim,
        comps=comps,
        layer_bytes=layer_bytes,
        bytes_pad=bytes_pad,
        **_on_device(stacked, ints, device, bf16=("encoder", "decoder")),
    )


def _on_device(
    tensors: dict[str, torch.Tensor], ints: Sequence[str], device: torch.device, bf16: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """Tables as the kernels read them: contiguous on `device`, int32 where named in `ints`, bf16 where in `bf16`,
    float32 elsewhere; with the scale code table."""
    kinds = dict.fromkeys(ints, torch.int32) | dict.fromkeys(bf16, torch.bfloat16)
    out = {name: t.to(kinds.get(name, torch.float32)).contiguous().to(device) for name, t in tensors.items()}
    out["scale_table"] = code_to_scale(torch.arange(256)).to(torch.float32).contiguous().to(device)
    return out


def tables(codes: Sequence[TransformCode], device: torch.device) -> CodeTables:
    """The (cached) fused kernels' tables of the layers' `codes` (one kind) on `device`."""
    return _cached(codes, device, _build)


def block_tables(codes: Sequence[TransformCode], device: torch.device) -> BlockTables:
    """The (cached) block kernels' tables of the units' `codes` (one kind) on `device`."""
    return _cached(codes, device, _build_blocks)


def _cached(codes: Sequence[TransformCode], device: torch.device, build):
    """`build(codes, device)`, kept until one of the codes dies or any of their tensors changes."""
    key = (build.__name__, tuple(id(code) for code in codes), str(device))
    stamp = _stamp(codes)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if hit is None:
        for code in codes:
            weakref.finalize(code, _CACHE.pop, key, None)
    built = build(codes, device)
    _CACHE[key] = (stamp, built)
    return built


@dataclass
class BlockTables:
    """U Reuse units' coders of one kind, all with G blocks of W columns, for the block kernels: the products run
    as batched matrix products over the U * G blocks, the kernels around them index [unit * G + block, ...].
    Components stop after the last one any block keeps (`comps`), past a block's own end with 0 bits."""

    blocks: int  # U * G
    width: int  # W
    comps: int  # C: components up to the last kept in any block
    unit_bytes: list[int]  # packed bytes per token of each unit (all its blocks)
    bytes_pad: int  # the largest block's bytes, rounded up to a multiple of BYTE_CHUNK
    slots: int  # the most (component, low or high part) pairs whose bits land in one byte
    mean: torch.Tensor  # (U * G, W) fp32
    encoder: torch.Tensor  # (U * G, W, C) fp32, the columns of dropped components zero
    decoder: torch.Tensor  # (U * G, C, W) fp32 step[c] * decoder[c, :], zero rows where dropped
    out_mean: torch.Tensor  # (U * G, 1, W) fp32, added by the decoder product
    byte: torch.Tensor  # (U * G, C) int32 byte of a component's first bit, from its block's first byte
    shift: torch.Tensor  # (U * G, C) int32
    bits: torch.Tensor  # (U * G, C) int32
    step: torch.Tensor  # (U * G, C) fp32 quantizer step of a unit-RMS token (0 where 0 bits)
    peak: torch.Tensor  # (U * G, C) fp32 `TransformCode.peak_limits`: 0 below PEAK_BITS bits
    kept: torch.Tensor  # (U * G,) fp32 components with bits > 0, at least 1 (the RMS divisor)
    block_col: torch.Tensor  # (U * G,) int32 a block's first byte, in all units' codes side by side
    block_bytes: torch.Tensor  # (U * G,) int32
    sources: torch.Tensor  # (U * G, bytes_pad, slots) int32 2 * component + (1: its high part), -1: none
    scale_table: torch.Tensor  # (256,) fp32 code_to_scale of every scale code, exactly as the reference


def _byte_sources(bits: torch.Tensor, byte: torch.Tensor, shift: torch.Tensor, bytes_pad: int) -> list[list[int]]:
    """Per byte of one block, the (2 * component + part) whose bits land in it: part 0 the low bits of a component
    that starts there, part 1 the high bits of one that started in the byte before."""
    sources: list[list[int]] = [[] for _ in range(bytes_pad)]
    for c, (b, first, s) in enumerate(zip(bits.tolist(), byte.tolist(), shift.tolist(), strict=True)):
        if b:
            sources[first].append(2 * c)
            if s + b > 8:
                sources[first + 1].append(2 * c + 1)
    return sources


_PER_COMPONENT = ("encoder", "decoder", "byte", "shift", "bits", "step", "peak")  # padded to the tables' C


def _build_blocks(codes: Sequence[TransformCode], device: torch.device) -> BlockTables:
    blocks, width = codes[0].mean.shape
    if any(tuple(code.mean.shape) != (blocks, width) for code in codes):
        raise ValueError(f"block kernels need units of one shape, got {[tuple(c.mean.shape) for c in codes]}")
    last_kept = [int(kept.nonzero().max()) + 1 for code in codes if (kept := (code.bits.cpu() > 0).any(0)).any()]
    comps = max(last_kept, default=1)
    parts: dict[str, list[torch.Tensor]] = {}
    unit_bytes, sources = [], []
    for code in codes:
        if code.encoder.shape[:2] != (blocks, width) or code.decoder.shape[::2] != (blocks, width):
            raise ValueError(f"encoder {tuple(code.encoder.shape)} / decoder {tuple(code.decoder.shape)} do not fit")
        c = min(comps, code.bits.shape[-1])
        bits = code.bits[:, :c].long().cpu()
        steps = code.component_steps()[:, :c].float().cpu()
        byte, shift = (t[:, :c].long() for t in code.layout.offsets)
        start = code.layout.head_start
        unit = {
            "mean": code.mean.float().cpu(),
            "encoder": code.encoder[..., :c].float().cpu() * (bits > 0).unsqueeze(1),
            "decoder": code.decoder[:, :c].float().cpu() * steps.unsqueeze(-1),
            "out_mean": code.out_mean.float().cpu().unsqueeze(1),
            "byte": byte - start[:, None],
            "shift": shift,
            "bits": bits,
            "step": steps,
            "peak": code.peak_limits()[:, :c].float().cpu(),
            "kept": (bits > 0).sum(-1).clamp(min=1).float(),
            "block_col": start + sum(unit_bytes),
            "block_bytes": code.layout.head_bytes,
        }
        for name, t in unit.items():
            dim = -2 if name == "decoder" else -1
            parts.setdefault(name, []).append(_pad_comps(t, comps, dim) if name in _PER_COMPONENT else t)
        sources.extend(zip(bits, unit["byte"], shift, strict=True))
        unit_bytes.append(code.layout.bytes_per_token)
    stacked = {name: torch.cat(ts) for name, ts in parts.items()}
    bytes_pad = _whole_chunks(int(stacked["block_bytes"].max()))
    per_byte = [_byte_sources(*block, bytes_pad) for block in sources]
    slots = max(1, max(len(s) for block in per_byte for s in block))
    table = torch.full((len(per_byte), bytes_pad, slots), -1, dtype=torch.int32)
    for index, block in enumerate(per_byte):
        for j, found in enumerate(block):
            table[index, j, : len(found)] = torch.tensor(found, dtype=torch.int32)
    stacked["sources"] = table
    ints = ("byte", "shift", "bits", "block_col", "block_bytes", "sources")
    return BlockTables(
        blocks=len(per_byte),
        width=width,
        comps=comps,
        unit_bytes=unit_bytes,
        bytes_pad=bytes_pad,
        slots=slots,
        **_on_device(stacked, ints, device),
    )
