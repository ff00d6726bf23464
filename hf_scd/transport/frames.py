"""Frames: how a cache crosses a link, as a stream of self-describing, versioned, checked pieces.

Every frame is a 64-byte header and a body. The header (little-endian) is: magic ``SCDF``, u16 frame version, u8
kind, u8 flags (0), u32 sequence number, u32 layer index, u32 token count, u64 body length, u32 CRC-32 of the body,
then a 32-byte HMAC-SHA256 tag over the first 32 header bytes and the body (zeros without a shared key). A reader
checks the magic, version, kind, sequence and the declared length against its caps before it allocates the body,
then the tag, before it parses anything, then the CRC. Bodies are JSON or safetensors: no pickle anywhere.

A streamed transfer is OPEN (ids, positions, mask, artifacts, point), one LAYER per model layer in order, and END
(the producer's timings); a one-shot transfer is one PAYLOAD frame carrying `SCDPayload.to_bytes()`. A producer that
fails sends ABORT with its reason. REQUEST is how a consumer asks a producer for a prefix.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import struct
import zlib
from dataclasses import dataclass

from ..errors import AuthenticationError, CorruptPayloadError, PayloadVersionError

MAGIC = b"SCDF"
FRAME_VERSION = 1
_FIELDS = struct.Struct("<4sHBBIIIQI")
TAG_BYTES = 32
HEADER_BYTES = _FIELDS.size + TAG_BYTES  # 64
_NO_TAG = bytes(TAG_BYTES)


class Kind(enum.IntEnum):
    REQUEST = 1
    OPEN = 2
    LAYER = 3
    END = 4
    PAYLOAD = 5
    ABORT = 6


@dataclass(frozen=True)
class FrameHeader:
    kind: Kind
    seq: int
    layer: int
    tokens: int
    length: int
    crc: int


@dataclass(frozen=True)
class Frame:
    kind: Kind
    body: bytes
    layer: int = 0
    tokens: int = 0

    def json(self) -> dict:
        """The body of a JSON frame (REQUEST metadata, END, ABORT) as an object; a typed error otherwise."""
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptPayloadError(f"{self.kind.name} frame body is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise CorruptPayloadError(f"{self.kind.name} frame body is not a JSON object")
        return value


class FrameCodec:
    """Seals frames for one direction of one link, and opens them: numbering, CRC and (with `key`) the HMAC tag."""

    def __init__(self, key: bytes | None = None):
        self.key = key
        self.sent = 0
        self.received = 0

    def seal(self, frame: Frame) -> tuple[bytes, bytes]:
        """The (header, body) bytes of the next frame on this link."""
        fields = _FIELDS.pack(
            MAGIC, FRAME_VERSION, frame.kind, 0, self.sent, frame.layer, frame.tokens, len(frame.body),
            zlib.crc32(frame.body),
        )  # fmt: skip
        self.sent += 1
        return fields + self._tag(fields, frame.body), frame.body

    def read_header(self, raw: bytes) -> FrameHeader:
        """Check a received header before its body is read: magic, version, kind and order."""
        if len(raw) != HEADER_BYTES:
            raise CorruptPayloadError(f"frame header is {len(raw)} bytes, expected {HEADER_BYTES}")
        magic, version, kind, flags, seq, layer, tokens, length, crc = _FIELDS.unpack_from(raw)
        if magic != MAGIC:
            raise CorruptPayloadError("not an hf-scd frame (bad magic bytes): the peer does not speak hf-scd")
        if version != FRAME_VERSION:
            raise PayloadVersionError(
                f"frame version {version}; this hf-scd speaks version {FRAME_VERSION}: run the same hf-scd release "
                "on both ends"
            )
        if kind not in Kind._value2member_map_ or flags:
            raise CorruptPayloadError(f"unknown frame kind {kind} (flags {flags})")
        if seq != self.received:
            raise CorruptPayloadError(f"frame {seq} arrived where frame {self.received} was due")
        return FrameHeader(Kind(kind), seq, layer, tokens, length, crc)

    def open(self, raw: bytes, header: FrameHeader, body: bytes) -> Frame:
        """Authenticate and check a frame's body, then count it as received."""
        if self.key is not None and not hmac.compare_digest(raw[_FIELDS.size :], self._tag(raw[: _FIELDS.size], body)):
            raise AuthenticationError(
                "frame authentication failed: the frame was altered in transit, or the peer does not hold this link's "
                "shared key; nothing in it was read"
            )
        if zlib.crc32(body) != header.crc:
            raise CorruptPayloadError(f"{header.kind.name} frame checksum mismatch: its bytes were altered in transit")
        self.received += 1
        return Frame(header.kind, body, header.layer, header.tokens)

    def _tag(self, fields: bytes, body: bytes) -> bytes:
        if self.key is None:
            return _NO_TAG
        mac = hmac.new(self.key, fields, hashlib.sha256)
        mac.update(body)
        return mac.digest()


def json_frame(kind: Kind, value: dict, **header) -> Frame:
    return Frame(kind, json.dumps(value, sort_keys=True).encode(), **header)
