"""The wire format: round trip, and a typed error for every way the bytes can be wrong."""

import json
import struct
import zlib

import pytest
import torch
from safetensors.torch import load, save

from hf_scd import CorruptPayloadError, PayloadVersionError, SCDPayload, TruncatedPayloadError
from hf_scd.codes import LayerCodes
from hf_scd.payload import _HEADER, FORMAT_VERSION, MAGIC, METADATA_KEY


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


@pytest.mark.parametrize("version", [4, 99])  # 4: codec v2's payloads, every layer carrying its own codes
def test_unknown_version(version):
    blob = bytearray(_payload().to_bytes())
    struct.pack_into("<H", blob, 6, version)
    with pytest.raises(PayloadVersionError, match=f"version {version}; this hf-scd reads version 5"):
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


def _parts(payload: SCDPayload) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A payload's safetensors tensors and hf-scd metadata, to be altered and sealed again with `_seal`."""
    body = payload.to_bytes()[_HEADER.size :]
    (header_len,) = struct.unpack_from("<Q", body)
    metadata = json.loads(json.loads(body[8 : 8 + header_len])["__metadata__"][METADATA_KEY])
    return load(body), metadata


def _seal(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A well-formed payload (valid header and CRC) around whatever tensors and metadata it is given."""
    body = save(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body), len(body)) + body


def test_declared_layer_widths_must_match_the_codes():
    tensors, metadata = _parts(_payload())
    metadata["key_codes_widths"] = "9,0"  # the codes are 7 + 0 bytes wide
    with pytest.raises(CorruptPayloadError, match="layer widths"):
        SCDPayload.from_bytes(_seal(tensors, metadata))


def test_to_bytes_is_deterministic():
    """Two encodes of the same payload are the same bytes, so payloads can be hashed and cached."""
    assert _payload().to_bytes() == _payload().to_bytes()
    assert SCDPayload.from_bytes(_payload().to_bytes()).to_bytes() == _payload().to_bytes()


def _negative_width(tensors, metadata):
    metadata["key_scales_widths"] = "-1,4,0"
    tensors["key_scales"] = tensors["key_scales"][:, :3]


def _exact(value):
    def mutate(tensors, _metadata):
        tensors["exact_keys"] = tensors["exact_keys"].clone()
        tensors["exact_keys"].view(-1)[0] = value

    return mutate


def _set(name, values):
    def mutate(tensors, _metadata):
        tensors[name] = torch.tensor([values], dtype=tensors[name].dtype)

    return mutate


def _retype(name, dtype):
    def mutate(tensors, _metadata):
        tensors[name] = tensors[name].to(dtype)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_negative_width, "negative layer width"),
        (_exact(float("nan")), "non-finite exact"),
        (_exact(float("inf")), "non-finite exact"),
        (_set("position_ids", [0, 1, 1, 2, 3]), "rise strictly"),
        (_set("position_ids", [4, 3, 2, 1, 0]), "rise strictly"),
        (_set("position_ids", [-1, 0, 1, 2, 3]), "negative"),
        (_set("input_ids", [0, -5, 1, 2, 3]), "negative"),
        (_set("attention_mask", [0, 0, 0, 0, 0]), "without a real token"),
        (_set("attention_mask", [1, 2, 1, 1, 1]), "other than 0 and 1"),
        (_retype("input_ids", torch.float32), "has no allowed dtype|has dtype"),
        (_retype("position_ids", torch.int64), "has no allowed dtype|has dtype"),
        (_retype("attention_mask", torch.bool), "has no allowed dtype|has dtype"),
    ],
)
def test_well_sealed_but_wrong_payloads_are_corruption(mutate, message):
    """Bytes with a valid CRC can still be wrong: every such case is a CorruptPayloadError saying what is wrong."""
    tensors, metadata = _parts(_payload())
    mutate(tensors, metadata)
    with pytest.raises(CorruptPayloadError, match=message):
        SCDPayload.from_bytes(_seal(tensors, metadata))


def _with_header(edit) -> bytes:
    body = _payload().to_bytes()[_HEADER.size :]
    (header_len,) = struct.unpack_from("<Q", body)
    header = json.loads(body[8 : 8 + header_len])
    edit(header)
    raw = json.dumps(header).encode()
    forged = struct.pack("<Q", len(raw)) + raw + body[8 + header_len :]
    return _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(forged), len(forged)) + forged


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.update({"__metadata__": None}), "no hf-scd metadata"),
        (lambda h: h["input_ids"].update({"dtype": "F8_E8M0"}), "no allowed dtype"),
        (lambda h: h["input_ids"].update({"dtype": "F4"}), "no allowed dtype"),
        (lambda h: h["key_codes"].update({"shape": [0, 2**63]}), "malformed shape"),
        (lambda h: h["key_codes"].update({"shape": [2**20, 2**20]}), "does not fit"),
        (lambda h: h["key_codes"].update({"data_offsets": [0, 2**40]}), "does not fit"),
    ],
)
def test_forged_safetensors_headers_are_refused_before_reading(edit, message):
    with pytest.raises(CorruptPayloadError, match=message):
        SCDPayload.from_bytes(_with_header(edit))
