"""The wire format: round trip, and a typed error for every way the bytes can be wrong."""

import struct

import pytest
import torch

from hf_scd import CorruptPayloadError, PayloadVersionError, SCDPayload, TruncatedPayloadError
from hf_scd.codes import LayerCodes


def _payload(layers: int = 2, tokens: int = 5, exact: int = 1) -> SCDPayload:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    coded = tokens - exact

    def codes(width: int):
        return torch.randint(0, 256, (coded, width), generator=generator, dtype=torch.uint8)

    def scales():
        return codes(3)

    def exact_kv():
        return torch.randn(exact, 3, 8, generator=generator).to(torch.bfloat16)

    return SCDPayload(
        artifacts_id="abc",
        model_fingerprint="def",
        operating_point="4x",
        input_ids=torch.arange(tokens)[None],
        position_ids=torch.arange(tokens)[None],
        attention_mask=mask,
        # The last layer is a cross-variant Patch layer: zero-width K/V codes, codes of its attention input.
        layers=[
            LayerCodes(codes(7 + layer), scales(), codes(5), scales(), exact_kv(), exact_kv(), codes(0), codes(0))
            for layer in range(layers - 1)
        ]
        + [LayerCodes(codes(0), codes(0), codes(0), codes(0), exact_kv(), exact_kv(), codes(11), codes(1))],
    )


def test_round_trip_is_exact(tmp_path):
    payload = _payload()
    again = SCDPayload.from_bytes(payload.to_bytes())
    assert again.operating_point == "4x" and again.artifacts_id == "abc"
    assert torch.equal(again.input_ids, payload.input_ids)
    for a, b in zip(again.layers, payload.layers, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values(), strict=True))
    payload.save(tmp_path / "p.scd")
    assert SCDPayload.load(tmp_path / "p.scd").num_tokens == 5


def test_layers_on_a_device_are_views_of_one_tensor_a_part():
    """What the kernels decode in one launch: each part of all layers moved at once, the layers its column views."""
    payload = _payload(layers=3)
    moved = payload.layers_on("cpu")
    for name in ("key_codes", "value_scales", "hidden_codes", "exact_keys"):
        parts = [getattr(layer, name) for layer in moved]
        assert all(torch.equal(a, getattr(b, name)) for a, b in zip(parts, payload.layers, strict=True))
        assert len({t.untyped_storage().data_ptr() for t in parts}) == 1, name
        assert all(a is not getattr(b, name) for a, b in zip(parts, payload.layers, strict=True))


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
    payload.attention_mask[0, 0] = False  # the mask now says 4 tokens, the codes carry 5
    with pytest.raises(CorruptPayloadError, match="different number of tokens"):
        SCDPayload.from_bytes(payload.to_bytes())
    payload = _payload()
    payload.layers[1].value_scales = payload.layers[1].value_scales[:2]
    with pytest.raises(RuntimeError):  # tensors of different lengths cannot even be stacked into one body
        payload.to_bytes()


def test_declared_layer_widths_must_match_the_codes():
    from safetensors.torch import load, save

    from hf_scd.payload import _HEADER, FORMAT_VERSION, MAGIC, _read_metadata

    body = _payload().to_bytes()[_HEADER.size :]
    metadata = _read_metadata(body)
    metadata["key_codes_widths"] = "9,0"  # the codes are 7 + 0 bytes wide
    forged = save(load(body), metadata=metadata)
    import zlib

    blob = _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(forged), len(forged)) + forged
    with pytest.raises(CorruptPayloadError, match="layer widths"):
        SCDPayload.from_bytes(blob)
