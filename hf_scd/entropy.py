"""An optional lossless entropy stage for stored payloads and slow links: zstd over a payload's K/V codes laid out
symbol by symbol.

The codec packs every component's code in a fixed number of bits, each token's codes one after another. A byte-wise
coder finds little in that (DEFLATE shrinks 8x codes 1.3%): bytes mix the bits of components of different widths.
Coefficients are normalised to unit spread by their token's scale and quantized with the step of their bit width, so
the codes of every component of one width follow nearly the same law. The stage regroups them: per bit width, Reuse
unit and K/V, the codes of those components, component by component, as whole bytes of 8 // width codes each (four
2-bit codes, two 3- or 4-bit ones, one code of 5 bits or more), one zstd frame per width (level 1; `pip install
zstandard`). zstd codes these bytes within 1% of their per-width order-0 entropy, at a fraction of the codec's own
time.

The stage wraps a finished payload (or one stream frame: the layer that ends a Reuse unit) and gives it back byte for
byte, so fidelity is the codes' own.

    blob = compress_payload(cache.encode("8x", packed=False), artifacts)  # bytes to store or send
    payload = decompress_payload(blob, artifacts)           # the SCDPayload that was compressed
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch
from safetensors.torch import save as st_save

from .artifacts import SCDArtifacts
from .codec import UnpackedLayerCodes, code_rows, without_codes
from .codes import MAX_BITS, LayerCodes, TransformCode
from .errors import ArtifactMismatchError, CorruptPayloadError, PayloadLimitError
from .payload import SCDPayload, layer_from_bytes, layer_to_bytes, read_body, seal, unseal
from .plan import Plan, ReuseUnit

MAGIC = b"HFSCE\0"
FORMAT_VERSION = 2
_PAYLOAD, _LAYER = "payload", "layer"
_FORMATS = {_PAYLOAD: "hf-scd-entropy", _LAYER: "hf-scd-entropy-layer"}
ZSTD_LEVEL = 1


def compress_payload(payload: SCDPayload, artifacts: SCDArtifacts) -> bytes:
    """`payload` (made with `artifacts`) with its K/V codes entropy-coded: a header (magic ``HFSCE\\0``, u16 version,
    u32 CRC-32 of the body, u64 body length) and a safetensors body of the payload without its K/V codes, and the
    codes regrouped, one zstd frame per width, with the frames' lengths. Where the frames are not smaller than the
    codes (a very short prompt), the body holds the payload as it is."""
    units = list(_units(payload, artifacts))
    frames = _regroup([(code, layer, kind) for unit, layer in units for kind, code in _kinds(unit)])
    if not frames or sum(map(len, frames)) >= _packed_bytes(units):
        return _seal(_PAYLOAD, payload.to_bytes(), [], {"coded": "no"})
    layers = list(payload.layers)
    for unit, layer in units:
        layers[unit.members[-1]] = without_codes(layer)
    return _seal(_PAYLOAD, SCDPayload.of(payload.head, layers).to_bytes(), frames, {"coded": "yes"})


def decompress_payload(
    blob: bytes | bytearray | memoryview, artifacts: SCDArtifacts, *, max_bytes: int | None = None
) -> SCDPayload:
    """The payload `compress_payload` compressed with these artifacts. Damaged, truncated or foreign bytes raise a
    `PayloadError`; each frame of codes is checked against the size the artifacts' plan gives before it is decompressed,
    and a payload that would exceed `max_bytes` (what a receiver accepts from a peer) is a `PayloadLimitError`. The
    units' codes stay as the stage decodes them, one row per component (`UnpackedLayerCodes`): the decoder reads them
    so, and they are packed only if the payload is written out again."""
    stripped_bytes, frames, metadata = _read(bytes(blob), _PAYLOAD)
    if metadata.get("coded") == "no":  # stored as it was: compressing did not pay
        if frames:
            raise CorruptPayloadError("an uncoded compressed payload carries coded codes")
        return SCDPayload.from_bytes(stripped_bytes)
    if metadata.get("coded") != "yes":
        raise CorruptPayloadError("compressed payload does not say whether its codes are entropy-coded")
    stripped = SCDPayload.from_bytes(stripped_bytes)
    units = list(_units(stripped, artifacts, stripped=True))
    budget = None if max_bytes is None else max_bytes - len(stripped_bytes)
    parts = [(code, layer.codes_shape(kind)[0]) for unit, layer in units for kind, code in _kinds(unit)]
    rows = iter(_ungroup(frames, parts, budget, "payload"))
    layers = list(stripped.layers)
    for unit, layer in units:
        layers[unit.members[-1]] = UnpackedLayerCodes(layer, (unit.key, unit.value), next(rows), next(rows))
    return SCDPayload.of(stripped.head, layers)


def compress_layer(codes: LayerCodes, plan: Plan, index: int) -> bytes:
    """Layer `index`'s LAYER frame body for a stream coded with `plan`: for the layer that ends a Reuse unit, the same
    header, then the layer without its K/V codes and their zstd frames. Coding each frame keeps the stream's overlap
    of wire and decode. Any other layer, or where the frames are not smaller than the codes (a very short prompt),
    gets the plain body (`layer_to_bytes`)."""
    codes = codes.to(torch.device("cpu"))
    unit = plan.unit_ending_at(index)
    if unit is None:
        return layer_to_bytes(codes)
    frames = _regroup([(code, codes, kind) for kind, code in _kinds(unit)])
    if not frames or sum(map(len, frames)) >= _packed_bytes([(unit, codes)]):
        return layer_to_bytes(codes)
    return _seal(_LAYER, layer_to_bytes(without_codes(codes)), frames, {})


def decompress_layer(body: bytes, plan: Plan, index: int, tokens: int, *, max_bytes: int | None = None) -> LayerCodes:
    """The codes of layer `index`'s LAYER frame body, coded by `compress_layer` (known by its magic: its codes then
    stay unpacked, `UnpackedLayerCodes`) or plain, for a stream of `tokens` tokens: checked as a plain frame's are,
    each frame of codes against its size before it is decompressed, within `max_bytes` of codes. A coded body for a
    layer that ends no Reuse unit is refused."""
    if not body.startswith(MAGIC):
        return layer_from_bytes(body, index, tokens)
    unit = plan.unit_ending_at(index)
    if unit is None:
        raise CorruptPayloadError(f"layer {index} frame is entropy-coded, but the layer carries no Reuse unit's codes")
    stripped_bytes, frames, _ = _read(body, _LAYER)
    stripped = layer_from_bytes(stripped_bytes, index, tokens)
    coded = stripped.codes_shape("key")[0]
    rows = _ungroup(frames, [(unit.key, coded), (unit.value, coded)], max_bytes, f"layer {index}")
    return UnpackedLayerCodes(stripped, (unit.key, unit.value), *rows)


def _regroup(parts: list[tuple[TransformCode, LayerCodes, str]]) -> list[bytes]:
    """The parts' codes (a coder, the unit's last layer, "key" or "value") regrouped, one zstd frame per bit width they
    use (in increasing width): every part's group of that width in turn, each component by component as
    `_symbol_bytes`. A frame per width keeps each of zstd's blocks to one law, also where the groups are smaller than
    a block (a unit of a few hundred tokens). The parts' codes are unpacked one at a time, where they are packed."""
    symbols: list[list[torch.Tensor]] = [[] for _ in range(MAX_BITS + 1)]
    for code, layer, kind in parts:
        rows = code_rows(layer, kind, code)
        heads, components, tokens = rows.shape
        widths = _width_rows(code, tokens, components)
        if not widths:  # no coded token
            continue
        flat = rows.reshape(heads * components, tokens).to(torch.uint8)  # codes have at most 8 bits
        for bits, index in widths:
            symbols[bits].append(_symbol_bytes(flat.index_select(0, index).view(-1), bits))
    compressor = _zstandard().ZstdCompressor(level=ZSTD_LEVEL)
    return [compressor.compress(torch.cat(groups).numpy().tobytes()) for groups in symbols if groups]


def _ungroup(
    frames: list[bytes], parts: list[tuple[TransformCode, int]], max_bytes: int | None, what: str
) -> list[torch.Tensor]:
    """Inverse of `_regroup`: each part's codes as rows (heads, dim, tokens) uint8, 0 where a component has no bits,
    the parts given as (coder, tokens). Each frame must declare exactly the bytes its width's groups take, within
    `max_bytes` in all, before it is decompressed."""
    zstd = _zstandard()
    widths = [_width_rows(code, tokens, code.bits.shape[-1]) for code, tokens in parts]
    order = sorted(  # (width, part, codes): the frames' order
        (bits, number, tokens * index.numel())
        for number, ((_, tokens), part) in enumerate(zip(parts, widths, strict=True))
        for bits, index in part
    )
    sizes = [_symbol_bytes_size(count, bits) for bits, _, count in order]
    if max_bytes is not None and sum(sizes) > max_bytes:
        raise PayloadLimitError(f"compressed {what} would expand to {sum(sizes)} bytes of codes, over {max_bytes}")
    per_width: dict[int, int] = {}
    for (bits, _, _), size in zip(order, sizes, strict=True):
        per_width[bits] = per_width.get(bits, 0) + size
    if len(frames) != len(per_width):
        raise CorruptPayloadError(f"the {what} holds {len(frames)} frames of codes, its plan {len(per_width)} widths")
    data = []
    for (bits, expected), frame in zip(per_width.items(), frames, strict=True):
        try:
            declared = zstd.frame_content_size(frame)
        except zstd.ZstdError as exc:
            raise CorruptPayloadError(f"entropy-coded {bits}-bit codes of the {what} are not a zstd frame") from exc
        if declared != expected:
            raise CorruptPayloadError(f"{bits}-bit codes of the {what} declare {declared} bytes, the plan's {expected}")
        try:
            data.append(zstd.ZstdDecompressor().decompress(frame, max_output_size=expected, allow_extra_data=False))
        except zstd.ZstdError as exc:
            raise CorruptPayloadError(f"{bits}-bit codes of the {what} do not decompress: {exc}") from exc
        if len(data[-1]) != expected:
            raise CorruptPayloadError(f"{bits}-bit codes of the {what} hold {len(data[-1])} bytes, not {expected}")
    pieces = _bytes_tensor(b"".join(data)).split(sizes) if sizes else ()
    symbols = {(bits, number): (piece, count) for (bits, number, count), piece in zip(order, pieces, strict=True)}
    unpacked = []
    for number, ((code, tokens), part) in enumerate(zip(parts, widths, strict=True)):
        heads, dim = code.bits.shape
        rows = torch.zeros(heads * dim, tokens, dtype=torch.uint8)
        for bits, components in part:
            rows.index_copy_(0, components, _codes_of_bytes(*symbols[bits, number], bits).view(-1, tokens))
        unpacked.append(rows.view(heads, dim, tokens))
    return unpacked


def _units(
    payload: SCDPayload, artifacts: SCDArtifacts, stripped: bool = False
) -> Iterator[tuple[ReuseUnit, LayerCodes]]:
    """Every Reuse unit of the payload's plan, in order, with its last layer (which carries its codes), once the
    layer's K/V codes are checked to be as wide as the plan gives (zero-width in a stripped payload)."""
    if payload.artifacts_id != artifacts.artifacts_id:
        raise ArtifactMismatchError(
            f"payload was made with artifacts {payload.artifacts_id}, these are {artifacts.artifacts_id}"
        )
    for unit in artifacts.plan(payload.operating_point).units:
        index = unit.members[-1]
        layer: LayerCodes = payload.layers[index]
        for kind, code in _kinds(unit):
            width, expected = layer.codes_shape(kind)[1], 0 if stripped else code.layout.bytes_per_token
            if width != expected:
                raise CorruptPayloadError(f"layer {index} {kind} codes are {width} bytes wide, not {expected}")
        yield unit, layer


def _packed_bytes(units: list[tuple[ReuseUnit, LayerCodes]]) -> int:
    """Bytes of the units' K/V codes as the codec packs them."""
    return sum(
        code.layout.bytes_per_token * layer.codes_shape(kind)[0] for unit, layer in units for kind, code in _kinds(unit)
    )


def _kinds(unit: ReuseUnit) -> tuple[tuple[str, TransformCode], tuple[str, TransformCode]]:
    return ("key", unit.key), ("value", unit.value)


def _width_rows(code: TransformCode, tokens: int, components: int) -> list[tuple[int, torch.Tensor]]:
    """Per bit width the coder's components use, (width, those components as rows of (heads * components) rows, each
    head's first `components`, in order): one group each; none where no token is coded."""
    if not tokens:
        return []
    flat = code.bits[:, :components].reshape(-1).cpu()  # the stage runs on the CPU, whichever device the plan is on
    groups = [(bits, (flat == bits).nonzero().squeeze(-1)) for bits in range(1, MAX_BITS + 1)]
    return [(bits, index) for bits, index in groups if index.numel()]


def _symbol_bytes_size(count: int, bits: int) -> int:
    return -(-count // (8 // bits))


def _symbol_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of `bits` bits each -> bytes of 8 // bits codes (the first in the lowest bits; zeros pad the last
    byte)."""
    per = 8 // bits
    if per == 1:
        return codes
    parts = torch.nn.functional.pad(codes, (0, -codes.numel() % per)).view(-1, per)
    data = parts[:, 0].clone()
    for i in range(1, per):
        data |= parts[:, i] << (bits * i)
    return data


def _codes_of_bytes(data: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of `_symbol_bytes`: the first `count` uint8 codes."""
    per = 8 // bits
    if per == 1:
        return data[:count]
    shifts = torch.arange(0, bits * per, bits, dtype=torch.uint8)
    return ((data.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(-1)[:count]


def _seal(kind: str, rest: bytes, frames: list[bytes], metadata: dict[str, str]) -> bytes:
    body = st_save(
        {
            kind: _bytes_tensor(rest),
            "codes": _bytes_tensor(b"".join(frames)),
            "frames": torch.tensor([len(frame) for frame in frames], dtype=torch.int32),
        },
        metadata={"hf-scd": json.dumps({"format": _FORMATS[kind], **metadata}, sort_keys=True)},
    )
    return seal(body, MAGIC, FORMAT_VERSION)


def _read(blob: bytes, kind: str) -> tuple[bytes, list[bytes], dict[str, str]]:
    """The checked header and body of a compressed payload or layer: the rest of it, the codes' frames, metadata."""
    what = f"compressed {kind}"
    tensors, metadata = read_body(unseal(blob, MAGIC, FORMAT_VERSION, what))
    if metadata.get("format") != _FORMATS[kind] or set(tensors) != {kind, "codes", "frames"}:
        raise CorruptPayloadError(f"{what} does not declare the hf-scd entropy format")
    lengths = tensors.pop("frames")
    if any(tensor.ndim != 1 or tensor.dtype != torch.uint8 for tensor in tensors.values()) or lengths.ndim != 1:
        raise CorruptPayloadError(f"{what} tensors must be 1-D bytes and frame lengths")
    if lengths.dtype != torch.int32 or bool((lengths <= 0).any()) or int(lengths.sum()) != tensors["codes"].numel():
        raise CorruptPayloadError(f"{what}: its frame lengths do not add up to its codes")
    codes = tensors["codes"].numpy().tobytes()
    ends = lengths.cumsum(0).tolist()
    frames = [codes[end - length : end] for end, length in zip(ends, lengths.tolist(), strict=True)]
    return tensors[kind].numpy().tobytes(), frames, metadata


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _zstandard():
    try:
        import zstandard
    except ImportError as exc:  # an optional dependency: only this stage needs it
        raise ImportError("the entropy stage needs zstandard: pip install 'hf-scd[entropy]'") from exc
    return zstandard
