"""An optional lossless entropy stage for stored payloads and slow links: rANS over a payload's quantized K/V codes.

The codec packs every component's code in a fixed number of bits. Coefficients are normalised to unit spread by their
token's scale and quantized with the step of their bit width, so the codes of every component of one width follow
nearly the same law. One table per (Reuse unit, K/V, bit width), counted on the request itself and shipped with it
(a few KB), takes the codes within 2% of their per-component order-0 entropy. `constriction`'s rANS coder (Rust; `pip
install constriction`) does the coding.

The stage wraps a finished payload and gives it back byte for byte, so fidelity is the codes' own. It costs more CPU
than the codec itself (about 1.5-2x its encode and 3-4x its decode), so it pays on storage and on slow links, not on
fast ones; streams stay uncompressed.

    blob = compress_payload(cache.encode("8x"), artifacts)  # bytes to store or send
    payload = decompress_payload(blob, artifacts)           # the SCDPayload that was compressed
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from safetensors.torch import save as st_save

from .artifacts import SCDArtifacts
from .codec import pack_codes, unpack_codes
from .codes import MAX_BITS, LayerCodes, TransformCode
from .errors import ArtifactMismatchError, CorruptPayloadError, PayloadVersionError
from .payload import SCDPayload, read_body, seal, unseal

MAGIC = b"HFSCE\0"
FORMAT_VERSION = 1
_FORMAT = "hf-scd-entropy"
_KINDS = ("key", "value")


def compress_payload(payload: SCDPayload, artifacts: SCDArtifacts) -> bytes:
    """`payload` (made with `artifacts`) with its K/V codes rANS-coded: a header (magic ``HFSCE\\0``, u16 version,
    u32 CRC-32 of the body, u64 body length) and a safetensors body of the payload without its K/V codes, the tables
    and the coded stream. Where that is not smaller (a short prompt: the tables outweigh what they save), the body
    holds the payload as it is."""
    constriction = _constriction()
    groups = list(_groups(payload, artifacts))
    tables, symbols = [], []
    for _, _, code, packed in groups:
        codes = unpack_codes(packed, code.layout).numpy()
        for bits in _widths(code, packed.shape[0]):
            group = codes[:, code.bits.numpy() == bits].reshape(-1)
            tables.append(np.bincount(group, minlength=1 << bits).astype(np.uint32))
            symbols.append(group)  # int32 already, as unpack_codes gives them
    coder = constriction.stream.stack.AnsCoder()
    for table, group in zip(reversed(tables), reversed(symbols), strict=True):
        coder.encode_reverse(group, _model(constriction, table))
    layers = list(payload.layers)
    for index, kind, _, packed in groups:
        layers[index] = replace(layers[index], **{f"{kind}_codes": packed[:, :0]})
    stripped = SCDPayload.of(payload.head, layers).to_bytes()
    table_words = np.concatenate(tables) if tables else np.zeros(0, np.uint32)
    stream = coder.get_compressed()
    plain = payload.to_bytes()
    coded = len(stripped) + 4 * (table_words.size + stream.size) < len(plain)
    if not coded:
        stripped, table_words, stream = plain, np.zeros(0, np.uint32), np.zeros(0, np.uint32)
    metadata = {"format": _FORMAT, "constriction": _version(), "coded": "yes" if coded else "no"}
    body = st_save(
        {
            "payload": torch.frombuffer(bytearray(stripped), dtype=torch.uint8),
            "tables": torch.from_numpy(table_words.view(np.int32).copy()),
            "stream": torch.from_numpy(stream.view(np.int32).copy()),
        },
        metadata={"hf-scd": json.dumps(metadata, sort_keys=True)},
    )
    return seal(body, MAGIC, FORMAT_VERSION)


def decompress_payload(blob: bytes | bytearray | memoryview, artifacts: SCDArtifacts) -> SCDPayload:
    """The payload `compress_payload` compressed with these artifacts. Damaged, truncated or foreign bytes raise a
    `PayloadError`; tables and codes are checked against the artifacts' plan before anything is decoded."""
    tensors, metadata = _read(bytes(blob))
    if metadata.get("coded") == "no":  # stored as it was: compressing did not pay
        if tensors["tables"].numel() or tensors["stream"].numel():
            raise CorruptPayloadError("an uncoded compressed payload carries entropy tables or a stream")
        return SCDPayload.from_bytes(tensors["payload"].numpy().tobytes())
    if metadata.get("coded") != "yes":
        raise CorruptPayloadError("compressed payload does not say whether its codes are entropy-coded")
    constriction = _constriction()
    if metadata.get("constriction", "").split(".")[:2] != _version().split(".")[:2]:
        raise PayloadVersionError(
            f"payload was entropy-coded with constriction {metadata.get('constriction')!r}, this side has "
            f"{_version()}: tables are quantized by the library, so both sides need the same version"
        )
    stripped = SCDPayload.from_bytes(tensors["payload"].numpy().tobytes())
    groups = list(_groups(stripped, artifacts, stripped=True))
    tables = tensors["tables"].numpy().view(np.uint32)
    sizes = [1 << bits for _, _, code, packed in groups for bits in _widths(code, packed.shape[0])]
    if tables.size != sum(sizes):
        raise CorruptPayloadError(f"entropy tables hold {tables.size} entries, the plan needs {sum(sizes)}")
    layers, start = list(stripped.layers), 0
    try:
        coder = constriction.stream.stack.AnsCoder(tensors["stream"].numpy().view(np.uint32).copy())
        for index, kind, code, packed in groups:
            rows = packed.shape[0]
            codes = np.zeros((rows, *code.bits.shape), dtype=np.int32)
            for bits in _widths(code, rows):
                table, start = tables[start : start + (1 << bits)], start + (1 << bits)
                mask = code.bits.numpy() == bits
                count = int(mask.sum())
                if int(table.sum()) != rows * count:
                    raise CorruptPayloadError(f"an entropy table of layer {index} does not count its codes")
                codes[:, mask] = coder.decode(_model(constriction, table), rows * count).reshape(rows, count)
            layers[index] = replace(
                layers[index], **{f"{kind}_codes": pack_codes(torch.from_numpy(codes), code.layout)}
            )
    except (ValueError, RuntimeError, AssertionError) as exc:  # constriction's errors on a damaged stream
        raise CorruptPayloadError(f"entropy-coded codes do not decode: {exc}") from exc
    if not coder.is_empty():
        raise CorruptPayloadError("entropy-coded stream holds more than the plan's codes")
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


def _widths(code: TransformCode, rows: int) -> list[int]:
    """The bit widths its components use, each a group with one table; none where no token is coded."""
    return [bits for bits in range(1, MAX_BITS + 1) if rows and bool((code.bits == bits).any())]


def _model(constriction, table: np.ndarray):
    """A categorical model of a table of counts; a symbol never seen keeps a small share, so none is uncodable."""
    return constriction.stream.model.Categorical(table.astype(np.float64) + 0.5, perfect=False)


def _read(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checked header and body of a compressed payload."""
    tensors, metadata = read_body(unseal(blob, MAGIC, FORMAT_VERSION, "compressed payload"))
    if metadata.get("format") != _FORMAT or set(tensors) != {"payload", "tables", "stream"}:
        raise CorruptPayloadError("compressed payload does not declare the hf-scd entropy format")
    if any(tensors[name].ndim != 1 for name in tensors) or tensors["payload"].dtype != torch.uint8:
        raise CorruptPayloadError("compressed payload tensors have the wrong shapes")
    if tensors["tables"].dtype != torch.int32 or tensors["stream"].dtype != torch.int32:
        raise CorruptPayloadError("compressed payload tables and stream must be 32-bit words")
    return tensors, metadata


def _version() -> str:
    return importlib.metadata.version("constriction")


def _constriction():
    try:
        import constriction
    except ImportError as exc:  # an optional dependency: only this stage needs it
        raise ImportError("the entropy stage needs constriction: pip install 'hf-scd[entropy]'") from exc
    return constriction
