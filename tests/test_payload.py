"""The wire format: round trip, and a typed error for every way the bytes can be wrong."""

import struct

import pytest
import torch

from hf_scd import CorruptPayloadError, PayloadVersionError, SCDPayload, TruncatedPayloadError
from hf_scd.codec import LayerCodes


def _payload(layers: int = 2, tokens: int = 5) -> SCDPayload:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(1, tokens, dtype=torch.bool)

    def codes():
        return torch.randint(0, 256, (tokens, 7), generator=generator, dtype=torch.uint8)

    return SCDPayload(
        artifacts_id="abc",
        model_fingerprint="def",
        operating_point="4x",
        input_ids=torch.arange(tokens)[None],
        position_ids=torch.arange(tokens)[None],
        attention_mask=mask,
        layers=[
            LayerCodes(codes(), torch.rand(tokens, 3).half(), codes(), torch.rand(tokens, 3).half())
            for _ in range(layers)
        ],
    )


def test_round_trip_is_exact(tmp_path):
    payload = _payload()
    again = SCDPayload.from_bytes(payload.to_bytes())
    assert again.operating_point == "4x" and again.artifacts_id == "abc"
    assert torch.equal(again.input_ids, payload.input_ids)
    for a, b in zip(again.layers, payload.layers, strict=False):
        assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values(), strict=False))
    payload.save(tmp_path / "p.scd")
    assert SCDPayload.load(tmp_path / "p.scd").num_tokens == 5


@pytest.mark.parametrize("cut", [3, 20, -1])
def test_truncated_payload(cut):
    blob = _payload().to_bytes()
    with pytest.raises(TruncatedPayloadError):
        SCDPayload.from_bytes(blob[:cut])


def test_flipped_byte_is_corruption():
    blob = bytearray(_payload().to_bytes())
    blob[len(blob) // 2] ^= 0x40
    with pytest.raises(CorruptPayloadError, match="checksum"):
        SCDPayload.from_bytes(blob)


def test_not_a_payload_and_trailing_bytes():
    with pytest.raises(CorruptPayloadError, match="magic"):
        SCDPayload.from_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(CorruptPayloadError, match="trailing"):
        SCDPayload.from_bytes(_payload().to_bytes() + b"\0")


def test_unknown_version():
    blob = bytearray(_payload().to_bytes())
    struct.pack_into("<H", blob, 6, 99)
    with pytest.raises(PayloadVersionError, match="version 99"):
        SCDPayload.from_bytes(blob)


def test_structurally_inconsistent_body_is_corruption():
    payload = _payload()
    payload.layers[1].value_scales = payload.layers[1].value_scales[:2]
    with pytest.raises(CorruptPayloadError, match="layer 1 value_scales"):
        SCDPayload.from_bytes(payload.to_bytes())
