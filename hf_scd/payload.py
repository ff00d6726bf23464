"""SCDPayload: the versioned, self-describing wire format of a shipped cache.

Layout: an 18-byte header (magic ``HFSCD\\0``, u16 format version, u32 CRC-32 of the body, u64 body length, all
little-endian) followed by a safetensors body. The body's metadata names the artifacts and producer model the codes
were made with; its tensors are the prefix token ids, position ids, attention mask, the packed K/V codes of all
layers side by side (one tensor per kind, layer widths in the metadata), their per-token scale codes, the codes of
the attention input of cross-variant Patch layers (same layout), and the exact bf16 K/V of the attention-sink
tokens. No pickle anywhere: reading a payload never runs code.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .codec import UnpackedLayerCodes
from .codes import CODED_KINDS, LayerCodes
from .errors import CorruptPayloadError, PayloadVersionError, TruncatedPayloadError

MAGIC = b"HFSCD\0"
# 4: the metadata is one sorted-JSON entry, so two encodes of the same cache are the same bytes.
# 5: codec v3: a Reuse unit of several layers ships its codes with its last layer (the others carry their sink), and
# one scale code per block of the unit.
FORMAT_VERSION = 5
METADATA_KEY = "hf-scd"
_HEADER = struct.Struct("<6sHIQ")
_TOKEN_DTYPES = {"input_ids": torch.int32, "position_ids": torch.int32, "attention_mask": torch.uint8}
_CODE_DTYPES = {
    "key_codes": torch.uint8,
    "key_scales": torch.uint8,
    "value_codes": torch.uint8,
    "value_scales": torch.uint8,
    "exact_keys": torch.bfloat16,
    "exact_values": torch.bfloat16,
    "hidden_codes": torch.uint8,
    "hidden_scales": torch.uint8,
}


@dataclass
class SCDPayload:
    """Everything a consumer needs to rebuild the cache, and the identity of what made it."""

    artifacts_id: str
    model_fingerprint: str
    operating_point: str
    input_ids: torch.Tensor  # (batch, seq) int64, the cached prefix
    position_ids: torch.Tensor  # (batch, seq) int64, the rotary positions the producer used
    attention_mask: torch.Tensor  # (batch, seq) bool, False for padding (which carries no codes)
    layers: list[LayerCodes]
    predicted_kl: float | None = None  # the producer's fidelity check: the KL it predicts this payload costs
    _wire: dict[str, tuple[torch.Tensor, list[int] | None]] | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens whose K/V the payload carries, coded or exact."""
        return int(self.attention_mask.sum())

    def _joined(self, device: torch.device | str) -> dict[str, tuple[torch.Tensor, list[int] | None]]:
        """Each part of all layers as one tensor on `device`: codes and scales side by side (with the layers'
        widths), exact K/V stacked (widths None). A payload read from bytes already holds them so: its layers are
        views of the tensors that came over the wire, and nothing is joined again."""
        if self._wire is not None:
            return {name: (tensor.to(device), widths) for name, (tensor, widths) in self._wire.items()}
        joined = {}
        for name in _CODE_DTYPES:
            per_layer = [getattr(layer, name) for layer in self.layers]
            if name.startswith("exact_"):
                joined[name] = (torch.stack(per_layer).to(device), None)
            else:
                joined[name] = (torch.cat(per_layer, 1).to(device), [t.shape[1] for t in per_layer])
        return joined

    def layers_on(self, device: torch.device | str) -> list[LayerCodes]:
        """The layers' codes on `device`, each part moved in one transfer for all layers; a layer's codes are then
        column views of one tensor, the layout the kernels decode in one launch. Layers holding their codes
        unpacked (`UnpackedLayerCodes`) are moved as they are: joining them would pack their codes."""
        if any(isinstance(layer, UnpackedLayerCodes) for layer in self.layers):
            return [layer.to(device) for layer in self.layers]
        parts = {
            name: joined.split(widths, 1) if widths is not None else joined.unbind(0)
            for name, (joined, widths) in self._joined(device).items()
        }
        layers = range(len(self.layers))
        return [LayerCodes(**{name: split[index] for name, split in parts.items()}) for index in layers]

    @classmethod
    def of(cls, head: PayloadHead, layers: list[LayerCodes]) -> SCDPayload:
        """A payload of `head`'s identity and tokens and the layers' codes."""
        return cls(
            head.artifacts_id,
            head.model_fingerprint,
            head.operating_point,
            head.input_ids,
            head.position_ids,
            head.attention_mask,
            layers,
            head.predicted_kl,
        )

    @property
    def head(self) -> PayloadHead:
        return PayloadHead(
            self.artifacts_id,
            self.model_fingerprint,
            self.operating_point,
            self.input_ids,
            self.position_ids,
            self.attention_mask,
            len(self.layers),
            self.predicted_kl,
        )

    def to_bytes(self) -> bytes:
        tensors = _token_tensors(self.input_ids, self.position_ids, self.attention_mask)
        metadata = self.head.identity("hf-scd-payload")
        for name, (joined, widths) in self._joined("cpu").items():
            tensors[name] = joined
            if widths is not None:
                metadata[f"{name}_widths"] = ",".join(map(str, widths))
        body = st_save(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        return seal(body, MAGIC, FORMAT_VERSION)

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> SCDPayload:
        return cls._from_parts(*read_body(unseal(bytes(blob), MAGIC, FORMAT_VERSION, "payload")))

    @classmethod
    def _from_parts(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> SCDPayload:
        try:
            if metadata.get("format") != "hf-scd-payload":
                raise CorruptPayloadError("payload metadata does not declare the hf-scd payload format")
            input_ids, position_ids, attention_mask = _read_tokens(tensors)
            _check_dtypes(tensors, _CODE_DTYPES)
            split, wire = {}, {}
            for name in (f"{kind}_{part}" for kind in CODED_KINDS for part in ("codes", "scales")):
                widths = [int(w) for w in metadata[f"{name}_widths"].split(",")]
                if any(w < 0 for w in widths):
                    raise CorruptPayloadError(f"payload {name} declares a negative layer width")
                tensor = tensors[name]
                if tensor.ndim != 2 or sum(widths) != tensor.shape[1]:
                    raise CorruptPayloadError(f"payload {name} do not match the layer widths it declares")
                split[name] = tensor.split(widths, 1)
                wire[name] = (tensor, widths)
            num_layers = len(split["key_codes"])
            if any(len(parts) != num_layers for parts in split.values()):
                raise CorruptPayloadError("payload declares a different number of layers for different parts")
            for kind in ("key", "value"):
                exact = tensors[f"exact_{kind}s"]
                if exact.ndim != 4 or exact.shape[0] != num_layers:
                    raise CorruptPayloadError(f"payload exact {kind}s do not cover every layer")
            layers = [
                LayerCodes(
                    **{name: parts[index] for name, parts in split.items()},
                    exact_keys=tensors["exact_keys"][index],
                    exact_values=tensors["exact_values"][index],
                )
                for index in range(num_layers)
            ]
            payload = cls(
                artifacts_id=metadata["artifacts_id"],
                model_fingerprint=metadata["model_fingerprint"],
                operating_point=metadata["operating_point"],
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                layers=layers,
                predicted_kl=_read_predicted_kl(metadata),
                _wire=wire | {name: (tensors[name], None) for name in ("exact_keys", "exact_values")},
            )
        except KeyError as exc:
            raise CorruptPayloadError(f"payload is missing the field {exc}") from exc
        except ValueError as exc:
            raise CorruptPayloadError(f"payload metadata is malformed: {exc}") from exc
        payload._check_shapes()
        return payload

    def _check_shapes(self) -> None:
        _check_tokens(self.input_ids, self.position_ids, self.attention_mask)
        tokens = self.num_tokens
        for index, layer in enumerate(self.layers):
            _check_layer(index, layer, tokens)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> SCDPayload:
        return cls.from_bytes(Path(path).read_bytes())


def seal(body: bytes, magic: bytes, version: int) -> bytes:
    """`body` behind the header every hf-scd container starts with: magic, u16 version, u32 CRC-32, u64 length."""
    return _HEADER.pack(magic, version, zlib.crc32(body), len(body)) + body


def unseal(blob: bytes, magic: bytes, version: int, what: str) -> bytes:
    """The body of a `seal`ed container, once its magic, version, length and checksum are checked."""
    if len(blob) < _HEADER.size:
        raise TruncatedPayloadError(f"{what} is {len(blob)} bytes, shorter than the {_HEADER.size}-byte header")
    found, found_version, crc, length = _HEADER.unpack_from(blob)
    if found != magic:
        raise CorruptPayloadError(f"not an hf-scd {what} (bad magic bytes)")
    if found_version != version:
        raise PayloadVersionError(
            f"{what} format version {found_version}; this hf-scd reads version {version}. "
            "Upgrade hf-scd on the consumer (or downgrade the producer) so both speak the same version."
        )
    body = blob[_HEADER.size :]
    if len(body) < length:
        raise TruncatedPayloadError(f"{what} body has {len(body)} of {length} bytes: it was cut short")
    if len(body) > length:
        raise CorruptPayloadError(f"{what} has {len(body) - length} unexpected trailing bytes")
    if zlib.crc32(body) != crc:
        raise CorruptPayloadError(f"{what} checksum mismatch: its bytes were altered in transit or on disk")
    return body


# Bytes per element of every dtype a payload tensor may have; anything else is refused before safetensors reads it.
_ITEM_SIZES = {"U8": 1, "I32": 4, "BF16": 2}
MAX_HEADER_BYTES = 1 << 20


def _check_body(body: bytes) -> dict[str, str]:
    """Check the safetensors header before anything is allocated: a bounded JSON object whose tensors each have an
    allowed dtype, a shape of non-negative integers, and data offsets that match the shape and lie in the body.
    Returns the hf-scd metadata."""
    if len(body) < 8:
        raise TruncatedPayloadError("payload body is shorter than its safetensors header length")
    (header_len,) = struct.unpack_from("<Q", body)
    if header_len > min(MAX_HEADER_BYTES, len(body) - 8):
        raise CorruptPayloadError(f"payload declares a {header_len}-byte safetensors header")
    try:
        header = json.loads(body[8 : 8 + header_len])
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptPayloadError(f"payload safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptPayloadError("payload safetensors header is not a JSON object")
    data_len = len(body) - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _ITEM_SIZES:
            raise CorruptPayloadError(f"payload tensor {name!r} has no allowed dtype ({', '.join(_ITEM_SIZES)})")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape)):
            raise CorruptPayloadError(f"payload tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CorruptPayloadError(f"payload tensor {name!r} has malformed data offsets")
        size = math.prod(shape) * _ITEM_SIZES[entry["dtype"]]
        if not 0 <= offsets[0] <= offsets[1] <= data_len or offsets[1] - offsets[0] != size:
            raise CorruptPayloadError(f"payload tensor {name!r} does not fit the bytes that carry it")
    metadata = header.get("__metadata__")
    try:
        metadata = json.loads(metadata[METADATA_KEY])
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptPayloadError("payload carries no hf-scd metadata") from exc
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptPayloadError("payload hf-scd metadata is not an object of strings")
    return metadata


@dataclass(frozen=True)
class PayloadHead:
    """What comes before a payload's layers: what made it, and the prefix's tokens. A stream sends it first, so the
    consumer can check it, and decode each layer as it arrives."""

    artifacts_id: str
    model_fingerprint: str
    operating_point: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_layers: int
    predicted_kl: float | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def identity(self, format_name: str) -> dict[str, str]:
        """The metadata a payload and a stream head both carry: format, artifacts, producer weights, point, and the
        KL the producer's fidelity check predicted, if it made one."""
        identity = {
            "format": format_name,
            "artifacts_id": self.artifacts_id,
            "model_fingerprint": self.model_fingerprint,
            "operating_point": self.operating_point,
        }
        if self.predicted_kl is not None:
            identity["predicted_kl"] = repr(float(self.predicted_kl))
        return identity

    def to_bytes(self) -> bytes:
        tensors = _token_tensors(self.input_ids, self.position_ids, self.attention_mask)
        metadata = self.identity("hf-scd-head") | {"num_layers": str(self.num_layers)}
        return st_save(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})

    @classmethod
    def from_bytes(cls, body: bytes) -> PayloadHead:
        tensors, metadata = read_body(body)
        try:
            if metadata.get("format") != "hf-scd-head":
                raise CorruptPayloadError("stream head does not declare the hf-scd head format")
            head = cls(
                metadata["artifacts_id"],
                metadata["model_fingerprint"],
                metadata["operating_point"],
                *_read_tokens(tensors),
                int(metadata["num_layers"]),
                _read_predicted_kl(metadata),
            )
        except KeyError as exc:
            raise CorruptPayloadError(f"stream head is missing the field {exc}") from exc
        except ValueError as exc:
            raise CorruptPayloadError(f"stream head metadata is malformed: {exc}") from exc
        _check_tokens(head.input_ids, head.position_ids, head.attention_mask)
        return head


def layer_to_bytes(codes: LayerCodes) -> bytes:
    """One layer's codes as a safetensors body: what a stream's LAYER frame carries."""
    tensors = {name: getattr(codes, name).contiguous() for name in _CODE_DTYPES}
    return st_save(tensors, metadata={METADATA_KEY: json.dumps({"format": "hf-scd-layer"})})


def layer_from_bytes(body: bytes, index: int, tokens: int) -> LayerCodes:
    """A LAYER frame's codes, checked like a payload's layer: dtypes, shapes, `tokens` real tokens, finite sink."""
    tensors, metadata = read_body(body)
    if metadata.get("format") != "hf-scd-layer":
        raise CorruptPayloadError(f"layer {index} frame does not declare the hf-scd layer format")
    try:
        _check_dtypes(tensors, _CODE_DTYPES)
        codes = LayerCodes(**{name: tensors[name] for name in _CODE_DTYPES})
    except KeyError as exc:
        raise CorruptPayloadError(f"layer {index} frame is missing the tensor {exc}") from exc
    for kind in CODED_KINDS:
        if getattr(codes, f"{kind}_codes").ndim != 2 or getattr(codes, f"{kind}_scales").ndim != 2:
            raise CorruptPayloadError(f"layer {index} frame's {kind} codes are not (tokens, bytes)")
    if codes.exact_keys.ndim != 3:
        raise CorruptPayloadError(f"layer {index} frame's exact K/V are not (tokens, heads, dim)")
    _check_layer(index, codes, tokens)
    return codes


def read_body(body: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and hf-scd metadata of a safetensors body, its header checked before anything is allocated."""
    metadata = _check_body(body)
    try:
        return st_load(body), metadata
    except (SafetensorError, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise CorruptPayloadError(f"body is not valid safetensors: {exc}") from exc


def _read_predicted_kl(metadata: dict[str, str]) -> float | None:
    """The producer's predicted KL, if it sent one: a finite number >= 0, or the payload is refused."""
    if "predicted_kl" not in metadata:
        return None
    try:
        value = float(metadata["predicted_kl"])
    except ValueError as exc:
        raise CorruptPayloadError(f"payload predicted_kl is not a number: {metadata['predicted_kl']!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise CorruptPayloadError(f"payload predicted_kl must be a finite KL >= 0, got {value!r}")
    return value


def _token_tensors(input_ids, position_ids, attention_mask) -> dict[str, torch.Tensor]:
    return {
        "input_ids": input_ids.to(torch.int32).contiguous(),
        "position_ids": position_ids.to(torch.int32).contiguous(),
        "attention_mask": attention_mask.to(torch.uint8).contiguous(),
    }


def _check_dtypes(tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> None:
    for name, dtype in dtypes.items():
        if tensors[name].dtype != dtype:
            raise CorruptPayloadError(f"payload {name} has dtype {tensors[name].dtype}, expected {dtype}")


def _read_tokens(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, attention_mask) as int64, int64, bool, from their wire dtypes."""
    _check_dtypes(tensors, _TOKEN_DTYPES)
    if bool((tensors["attention_mask"] > 1).any()):
        raise CorruptPayloadError("payload attention_mask holds values other than 0 and 1")
    return tensors["input_ids"].long(), tensors["position_ids"].long(), tensors["attention_mask"].bool()


def _check_tokens(input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    shape = input_ids.shape
    if input_ids.ndim != 2 or position_ids.shape != shape or attention_mask.shape != shape:
        raise CorruptPayloadError("payload ids, positions and mask do not share one (batch, seq) shape")
    if not attention_mask.any(-1).all():
        raise CorruptPayloadError("payload has no rows, or a row without a real token")
    real = attention_mask
    if bool((input_ids[real] < 0).any()) or bool((position_ids[real] < 0).any()):
        raise CorruptPayloadError("payload has negative token ids or positions")
    # Real tokens' positions rise strictly along each row (padding, on the left, is not looked at).
    previous = torch.where(real, position_ids, -1).cummax(-1).values[:, :-1]
    if bool((real[:, 1:] & (position_ids[:, 1:] <= previous)).any()):
        raise CorruptPayloadError("payload positions do not rise strictly along each row")


def _check_layer(index: int, layer: LayerCodes, tokens: int) -> None:
    coded = layer.key_codes.shape[0]
    parts = (getattr(layer, f"{kind}_{part}") for kind in CODED_KINDS for part in ("codes", "scales"))
    same_coded = all(t.shape[0] == coded for t in parts)
    same_exact = layer.exact_values.shape == layer.exact_keys.shape
    if coded + layer.exact_keys.shape[0] != tokens or not (same_coded and same_exact):
        raise CorruptPayloadError(f"layer {index} carries K/V for a different number of tokens than the mask")
    if not (layer.exact_keys.isfinite().all() and layer.exact_values.isfinite().all()):
        raise CorruptPayloadError(f"layer {index} has non-finite exact (sink) K/V")
