"""The block path: `encode_rows` / `decode_rows` for Reuse units of any one shape, joint units of several layers
included, on CUDA tensors.

A joint unit codes all its layers' KV heads as one block (SmolLM2's 5-layer units: 960 columns and as many
components), too wide for the fused kernels' one pass per (tokens, head) to hold its product. So the work is split
where it is cheapest: batched matrix products of every unit's blocks (cuBLAS, in fp32 as the reference computes them
on CUDA), and around them one kernel launch a step for all units: `gather` (read the coded rows of every member
layer, de-rotate keys, centre) -> product by the encoders -> `quantize` (scale code, quantize, pack); `dequantize`
(unpack, scale) -> product by the decoders (steps folded in, plus the output mean) -> `scatter` (re-rotate keys,
write the output rows). The fp32 intermediates are (U * G, tokens, W) and (U * G, tokens, C), so tokens are coded
`CHUNK_TOKENS` at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch

from hf_scd.codes import CoderPair, LayerCodes, RowCodes, TransformCode

from ._launch import KernelLaunch, LayerPointers, autotuned, layer_pointers, unit_stride
from ._tables import BYTE_CHUNK, BlockTables, block_tables
from .dequantize import _dequantize_kernel
from .gather import _gather_kernel
from .quantize import _quantize_kernel
from .scatter import _scatter_kernel

COMPONENT_CHUNK = 128  # components a quantize or dequantize program reads at once
# Tokens coded at once: bounds the fp32 intermediates at 8 bytes a component per token of a chunk (SmolLM2's joint
# units: 750 MB a kind), whatever the context length.
CHUNK_TOKENS = 16384

_gather_tuned = autotuned(_gather_kernel, key=["D", "ROTARY"])
_scatter_tuned = autotuned(_scatter_kernel, key=["D", "ROTARY"])
_quantize_tuned = autotuned(_quantize_kernel, key=["CK", "BYTES_PAD", "SLOTS"])
_dequantize_tuned = autotuned(_dequantize_kernel, key=["CK"])


def _head_places(tab: BlockTables, units: int, members: int, heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    """Per (member layer of all units in order, head): its block (unit * G + block within the unit) and its first
    column there, int32 (units * members * heads,) each; made once per table and shape."""
    places = tab.__dict__.setdefault("_places", {})
    key = (units, members, heads, dim)
    if key not in places:
        layer = torch.arange(units * members)[:, None]
        flat = ((layer % members) * heads + torch.arange(heads)) * dim  # column in its unit's (layers, H, d) vector
        block = layer // members * (tab.blocks // units) + flat // tab.width
        places[key] = tuple(t.flatten().to(tab.mean.device, torch.int32) for t in (block, flat % tab.width))
    return places[key]


def _per_layer(
    kernel, tuned, tensors: list[torch.Tensor], places: tuple[torch.Tensor, ...], rows: int, make_args, meta: dict
) -> list[KernelLaunch]:
    """Launches of a gather or scatter `kernel` over every layer's cache tensor: one when they share dtype and
    strides (`layer_pointers`), else one a layer. `make_args(pointers, block, col)` builds a launch's arguments."""
    heads = tensors[0].shape[1]
    pointers = layer_pointers(tensors)
    groups = [(pointers, 0, len(tensors))] if pointers else [(layer_pointers([t]), i, 1) for i, t in enumerate(tensors)]
    launches = []
    for group, first, count in groups:
        span = slice(first * heads, (first + count) * heads)
        args = make_args(group, *(place[span] for place in places))
        launches.append(KernelLaunch(kernel, tuned, rows, heads, count, args, meta | {"ALIGN": group.align}))
    return launches


def _token_spans(tokens: int) -> list[slice]:
    """The chunks of at most CHUNK_TOKENS rows a request is coded in; one (empty) for no rows."""
    return [slice(start, start + CHUNK_TOKENS) for start in range(0, max(tokens, 1), CHUNK_TOKENS)]


def _encode_outputs(tab: BlockTables, units: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """All units' packed codes (N, bytes) uint8 side by side, and their scale codes (N, U, G) uint8."""
    packed = torch.empty(tokens, sum(tab.unit_bytes), dtype=torch.uint8, device=device)
    return packed, torch.empty(tokens, units, tab.blocks // units, dtype=torch.uint8, device=device)


def encode_steps(
    layers: list[torch.Tensor],
    members: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    codes: Sequence[TransformCode],
    rotary: bool,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[Callable[[], object]], list[torch.Tensor], list[torch.Tensor]]:
    """The steps coding tokens `rows` (int64, on the device) of one kind (keys or values) of every unit, whose
    member layers' caches (batch, H, seq, d) are `layers` in unit order, and per unit the packed codes (N, bytes)
    and scale codes (N, G) they fill: gather launch(es), the product by the encoders, one quantize launch. They fill
    `out` (all units' codes (N, bytes) and scales (N, U, G), `_encode_outputs`) where given, else new tensors."""
    device = rows.device
    tab = block_tables(codes, device)
    units, n = len(codes), rows.numel()
    _, heads, seq, dim = layers[0].shape
    packed, scales = _encode_outputs(tab, units, n, device) if out is None else out
    outputs = list(packed.split(tab.unit_bytes, 1)), list(scales.unbind(1))
    if n == 0:
        return [], *outputs
    centred = torch.empty(tab.blocks, n, tab.width, dtype=torch.float32, device=device)
    coefficients = torch.empty(tab.blocks, n, tab.comps, dtype=torch.float32, device=device)

    def gather_args(pointers: LayerPointers, block: torch.Tensor, col: torch.Tensor) -> tuple:
        return (
            pointers.base, pointers.offsets, rows, cos, sin, tab.mean, block, col, centred,
            n, tab.width, seq, heads, *pointers.base.stride()[:3], cos.stride(0), sin.stride(0),
        )  # fmt: skip

    places = _head_places(tab, units, members, heads, dim)
    gathers = _per_layer(_gather_kernel, _gather_tuned, layers, places, n, gather_args, dict(ROTARY=rotary, D=dim))
    args = (
        coefficients, tab.bits, tab.step, tab.peak, tab.kept, tab.shift, tab.sources, tab.block_col, tab.block_bytes,
        tab.scale_table, packed, scales, n, tab.comps, packed.stride(0), scales.stride(0),
    )  # fmt: skip
    meta = dict(CK=COMPONENT_CHUNK, BYTES_PAD=tab.bytes_pad, SLOTS=tab.slots, BJ=BYTE_CHUNK)
    quantize = KernelLaunch(_quantize_kernel, _quantize_tuned, n, 1, tab.blocks, args, meta)
    return [*gathers, partial(torch.bmm, centred, tab.encoder, out=coefficients), quantize], *outputs


def encode_rows(
    keys: Sequence[Sequence[torch.Tensor]],
    values: Sequence[Sequence[torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
) -> list[RowCodes]:
    """Kernel version of `hf_scd.codec.encode_rows` (same arguments and results) for units that
    `hf_scd.kernels.covers` accepts."""
    rows = rows.to(device=keys[0][0].device, dtype=torch.int64).contiguous()
    cos, sin = unit_stride(cos), unit_stride(sin)
    outputs = []
    for kind, units in enumerate((keys, values)):
        layers = [unit_stride(layer) for unit in units for layer in unit]
        codes = [pair[kind] for pair in coders]
        tab = block_tables(codes, rows.device)
        packed, scales = _encode_outputs(tab, len(codes), rows.numel(), rows.device)
        for span in _token_spans(rows.numel()):
            out = (packed[span], scales[span])
            for step in encode_steps(layers, len(units[0]), cos, sin, rows[span], codes, kind == 0, out)[0]:
                step()
        outputs.append((list(packed.split(tab.unit_bytes, 1)), list(scales.unbind(1))))
    (key_codes, key_scales), (value_codes, value_scales) = outputs
    return list(zip(key_codes, key_scales, value_codes, value_scales, strict=True))


def decode_steps(
    packed: list[torch.Tensor],
    scales: list[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    codes: Sequence[TransformCode],
    outs: list[torch.Tensor],
    members: int,
    rotary: bool,
) -> list[Callable[[], object]]:
    """The steps decoding one kind of every unit, its packed codes (N, bytes) and scale codes (N, G), into tokens
    `rows` of every member layer's output (batch, H, seq, d), `outs` in unit order: one dequantize launch, the
    product by the decoders, scatter launch(es)."""
    device = rows.device
    tab = block_tables(codes, device)
    units, n = len(codes), rows.numel()
    _, heads, seq, dim = outs[0].shape
    for index, (unit_codes, unit_scales) in enumerate(zip(packed, scales, strict=True)):
        if unit_codes.shape != (n, tab.unit_bytes[index]) or unit_scales.shape != (n, tab.blocks // units):
            raise ValueError(f"unit {index}: codes {tuple(unit_codes.shape)} / scales {tuple(unit_scales.shape)}")
    if any(out.stride(-1) != 1 for out in outs):
        raise ValueError("decode outputs must be contiguous in head_dim, as attention reads them")
    if n == 0:
        return []
    all_codes = torch.cat(packed, 1) if len(packed) > 1 else unit_stride(packed[0])
    all_scales = torch.stack(scales, 1).view(n, tab.blocks)
    scaled = torch.empty(tab.blocks, n, tab.comps, dtype=torch.float32, device=device)
    decoded = torch.empty(tab.blocks, n, tab.width, dtype=torch.float32, device=device)
    args = (
        all_codes, all_scales, tab.byte, tab.shift, tab.bits, tab.block_col, tab.block_bytes, tab.scale_table,
        scaled, n, tab.comps, all_codes.stride(0), all_scales.stride(0),
    )  # fmt: skip
    chunks = -(-tab.comps // COMPONENT_CHUNK)
    dequantize = KernelLaunch(
        _dequantize_kernel, _dequantize_tuned, n, chunks, tab.blocks, args, dict(CK=COMPONENT_CHUNK)
    )

    def scatter_args(pointers: LayerPointers, block: torch.Tensor, col: torch.Tensor) -> tuple:
        return (
            decoded, rows, cos, sin, block, col, pointers.base, pointers.offsets,
            n, tab.width, seq, heads, *pointers.base.stride()[:3], cos.stride(0), sin.stride(0),
        )  # fmt: skip

    places = _head_places(tab, units, members, heads, dim)
    scatters = _per_layer(_scatter_kernel, _scatter_tuned, outs, places, n, scatter_args, dict(ROTARY=rotary, D=dim))
    return [dequantize, partial(torch.baddbmm, tab.out_mean, scaled, tab.decoder, out=decoded), *scatters]


def decode_rows(
    codes: Sequence[LayerCodes],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
    out_keys: Sequence[Sequence[torch.Tensor]],
    out_values: Sequence[Sequence[torch.Tensor]],
) -> None:
    """Kernel version of `hf_scd.codec.decode_rows` (same arguments, writes in place) for units that
    `hf_scd.kernels.covers` accepts."""
    rows = rows.to(device=out_keys[0][0].device, dtype=torch.int64).contiguous()
    cos, sin = unit_stride(cos), unit_stride(sin)
    for kind, (name, outs) in enumerate((("key", out_keys), ("value", out_values))):
        packed = [getattr(unit, f"{name}_codes") for unit in codes]
        scales = [getattr(unit, f"{name}_scales") for unit in codes]
        for span in _token_spans(rows.numel()):
            steps = decode_steps(
                [t[span] for t in packed], [t[span] for t in scales], cos, sin, rows[span],
                [pair[kind] for pair in coders], [layer for unit in outs for layer in unit], len(outs[0]),
                rotary=kind == 0,
            )  # fmt: skip
            for step in steps:
                step()
