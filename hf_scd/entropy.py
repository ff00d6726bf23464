"""An optional lossless entropy stage for stored payloads and slow links: zstd over a payload's K/V codes laid out
symbol by symbol.

The codec packs every component's code in a fixed number of bits, each token's codes one after another. A byte-wise
coder finds little in that (DEFLATE shrinks 8x codes 1.3%): bytes mix the bits of components of different widths.
Coefficients are normalised to unit spread by their token's scale and quantized with the step of their bit width, so
the codes of every component of one width follow nearly the same law. The stage regroups them: per Reuse unit, K/V
and bit width, the codes of those components, component by component, as whole bytes of 8 // width codes each (four
2-bit codes, two 3- or 4-bit ones, one code of 5 bits or more). zstd (level 1; `pip install zstandard`) codes these
bytes within 1% of their per-width order-0 entropy, at a fraction of the codec's own time.

The stage wraps a finished payload and gives it back byte for byte, so fidelity is the codes' own. Streams stay
uncompressed.

    blob = compress_payload(cache.encode("8x"), artifacts)  # bytes to store or send
    payload = decompress_payload(blob, artifacts)           # the SCDPayload that was compressed
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import torch
from safetensors.torch import save as st_save

from .artifacts import SCDArtifacts
from .codec import pack_codes, unpack_codes
from .codes import MAX_BITS, LayerCodes, TransformCode
from .errors import ArtifactMismatchError, CorruptPayloadError, PayloadLimitError
from .payload import SCDPayload, read_body, seal, unseal

MAGIC = b"HFSCE\0"
FORMAT_VERSION = 2
_FORMAT = "hf-scd-entropy"
_KINDS = ("key", "value")
ZSTD_LEVEL = 1


def compress_payload(payload: SCDPayload, artifacts: SCDArtifacts) -> bytes:
    """`payload` (made with `artifacts`) with its K/V codes entropy-coded: a header (magic ``HFSCE\\0``, u16 version,
    u32 CRC-32 of the body, u64 body length) and a safetensors body of the payload without its K/V codes and one zstd
    frame of the codes regrouped by width. Where that is not smaller (a short prompt), the body holds the payload as
    it is."""
    zstd = _zstandard()
    groups = list(_groups(payload, artifacts))
    symbols: list[list[torch.Tensor]] = [[] for _ in range(MAX_BITS + 1)]
    for _, _, code, packed in groups:
        rows = _component_rows(unpack_codes(packed, code.layout)).to(torch.uint8)  # codes have at most 8 bits
        for bits, index in _width_rows(code, packed.shape[0]):
            symbols[bits].append(_symbol_bytes(rows.index_select(0, index).view(-1), bits))
    symbols = [group for width in symbols for group in width]  # by width: zstd's blocks then each see one law
    layers = list(payload.layers)
    for index, kind, _, packed in groups:
        layers[index] = replace(layers[index], **{f"{kind}_codes": packed[:, :0]})
    stripped = SCDPayload.of(payload.head, layers).to_bytes()
    frame = zstd.ZstdCompressor(level=ZSTD_LEVEL).compress(torch.cat(symbols).numpy().tobytes() if symbols else b"")
    plain = payload.to_bytes()
    coded = len(stripped) + len(frame) < len(plain)
    if not coded:
        stripped, frame = plain, b""
    metadata = {"format": _FORMAT, "coded": "yes" if coded else "no"}
    body = st_save(
        {"payload": _bytes_tensor(stripped), "codes": _bytes_tensor(frame)},
        metadata={"hf-scd": json.dumps(metadata, sort_keys=True)},
    )
    return seal(body, MAGIC, FORMAT_VERSION)


def decompress_payload(
    blob: bytes | bytearray | memoryview, artifacts: SCDArtifacts, *, max_bytes: int | None = None
) -> SCDPayload:
    """The payload `compress_payload` compressed with these artifacts. Damaged, truncated or foreign bytes raise a
    `PayloadError`; the codes' frame is checked against the size the artifacts' plan gives before it is decompressed,
    and a payload that would exceed `max_bytes` (what a receiver accepts from a peer) is a `PayloadLimitError`."""
    tensors, metadata = _read(bytes(blob))
    if metadata.get("coded") == "no":  # stored as it was: compressing did not pay
        if tensors["codes"].numel():
            raise CorruptPayloadError("an uncoded compressed payload carries coded codes")
        return SCDPayload.from_bytes(tensors["payload"].numpy().tobytes())
    if metadata.get("coded") != "yes":
        raise CorruptPayloadError("compressed payload does not say whether its codes are entropy-coded")
    zstd = _zstandard()
    stripped = SCDPayload.from_bytes(tensors["payload"].numpy().tobytes())
    groups = list(_groups(stripped, artifacts, stripped=True))
    plan = [_width_rows(code, packed.shape[0]) for _, _, code, packed in groups]
    # The frame holds every group's bytes by width, then unit and kind: (width, group number, count, size)
    order = sorted(
        (bits, number, packed.shape[0] * index.numel())
        for number, ((_, _, _, packed), widths) in enumerate(zip(groups, plan, strict=True))
        for bits, index in widths
    )
    sizes = [_symbol_bytes_size(count, bits) for bits, _, count in order]
    if max_bytes is not None and tensors["payload"].numel() + sum(sizes) > max_bytes:
        raise PayloadLimitError(
            f"compressed payload would expand to more than {max_bytes} bytes ({tensors['payload'].numel()} besides "
            f"{sum(sizes)} of codes)"
        )
    frame = tensors["codes"].numpy().tobytes()
    try:
        declared = zstd.frame_content_size(frame)
    except zstd.ZstdError as exc:
        raise CorruptPayloadError(f"entropy-coded codes are not a zstd frame: {exc}") from exc
    if declared != sum(sizes):
        raise CorruptPayloadError(f"entropy-coded codes declare {declared} bytes, the plan's codes take {sum(sizes)}")
    try:
        data = zstd.ZstdDecompressor().decompress(frame, max_output_size=sum(sizes), allow_extra_data=False)
    except zstd.ZstdError as exc:
        raise CorruptPayloadError(f"entropy-coded codes do not decompress: {exc}") from exc
    if len(data) != sum(sizes):
        raise CorruptPayloadError(f"entropy-coded codes hold {len(data)} bytes, the plan's codes take {sum(sizes)}")
    pieces = _bytes_tensor(data).split(sizes) if sizes else ()
    symbols = {(bits, number): (piece, count) for (bits, number, count), piece in zip(order, pieces, strict=True)}
    layers = list(stripped.layers)
    for number, ((index, kind, code, packed), widths) in enumerate(zip(groups, plan, strict=True)):
        tokens = packed.shape[0]
        heads, dim = code.bits.shape
        rows = torch.zeros(heads * dim, tokens, dtype=torch.uint8)
        for bits, components in widths:
            codes = _codes_of_bytes(*symbols[bits, number], bits)
            rows.index_copy_(0, components, codes.view(-1, tokens))
        codes = rows.view(heads, dim, tokens).permute(2, 0, 1)
        layers[index] = replace(layers[index], **{f"{kind}_codes": pack_codes(codes, code.layout)})
    return SCDPayload.of(stripped.head, layers)


def _groups(
    payload: SCDPayload, artifacts: SCDArtifacts, stripped: bool = False
) -> Iterator[tuple[int, str, TransformCode, torch.Tensor]]:
    """(layer index, "key"/"value", coder, packed codes) of every Reuse unit of the payload's plan, in a fixed order;
    a stripped payload's codes are zero-width, one row per coded token still."""
    if payload.artifacts_id != artifacts.artifacts_id:
        raise ArtifactMismatchError(
            f"payload was made with artifacts {payload.artifacts_id}, these are {artifacts.artifacts_id}"
        )
    plan = artifacts.plan(payload.operating_point)
    for unit in plan.units:
        index = unit.members[-1]
        layer: LayerCodes = payload.layers[index]
        for kind, code in zip(_KINDS, (unit.key, unit.value), strict=True):
            packed = getattr(layer, f"{kind}_codes")
            expected = 0 if stripped else code.layout.bytes_per_token
            if packed.shape[1] != expected:
                raise CorruptPayloadError(
                    f"layer {index} {kind} codes are {packed.shape[1]} bytes wide, not {expected}"
                )
            yield index, kind, code, packed


def _width_rows(code: TransformCode, tokens: int) -> list[tuple[int, torch.Tensor]]:
    """Per bit width its components use, (width, their rows in `_component_rows` order): one group each; none where
    no token is coded."""
    flat = code.bits.reshape(-1)
    present = [bits for bits in range(1, MAX_BITS + 1) if tokens and bool((flat == bits).any())]
    return [(bits, (flat == bits).nonzero().squeeze(-1)) for bits in present]


def _component_rows(codes: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, dim) codes as (heads * dim, tokens), one row per component (a view of `unpack_codes`' rows)."""
    return codes.permute(1, 2, 0).reshape(-1, codes.shape[0])


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


def _read(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checked header and body of a compressed payload."""
    tensors, metadata = read_body(unseal(blob, MAGIC, FORMAT_VERSION, "compressed payload"))
    if metadata.get("format") != _FORMAT or set(tensors) != {"payload", "codes"}:
        raise CorruptPayloadError("compressed payload does not declare the hf-scd entropy format")
    if any(tensor.ndim != 1 or tensor.dtype != torch.uint8 for tensor in tensors.values()):
        raise CorruptPayloadError("compressed payload tensors must be 1-D bytes")
    return tensors, metadata


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _zstandard():
    try:
        import zstandard
    except ImportError as exc:  # an optional dependency: only this stage needs it
        raise ImportError("the entropy stage needs zstandard: pip install 'hf-scd[entropy]'") from exc
    return zstandard
