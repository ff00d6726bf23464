"""The optional entropy stage on the real default model: lossless byte for byte, smaller, and every damaged or
foreign input a typed error."""

import json
import struct

import pytest
import torch
from conftest import REPO
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hf_scd import ArtifactMismatchError, SCDArtifacts, SCDCache
from hf_scd.codec import UnpackedLayerCodes
from hf_scd.compat import with_cache
from hf_scd.entropy import (
    FORMAT_VERSION,
    MAGIC,
    _codes_of_bytes,
    _symbol_bytes,
    compress_layer,
    compress_payload,
    decompress_layer,
    decompress_payload,
)
from hf_scd.errors import CorruptPayloadError, PayloadLimitError, PayloadVersionError, TruncatedPayloadError
from hf_scd.eval.corpus import evaluation_texts
from hf_scd.payload import _HEADER, layer_to_bytes, seal

zstandard = pytest.importorskip("zstandard")


@pytest.fixture(scope="module")
def shipped(smollm2, artifacts):
    """A real prompt's 8x payload, and its entropy-coded bytes."""
    model, tokenizer = smollm2
    ids = tokenizer(evaluation_texts()[0], return_tensors="pt", add_special_tokens=False)["input_ids"][:, :512]
    with torch.inference_mode():
        cache = SCDCache(artifacts, model)
        model(ids, **with_cache(model, cache))
        payload = cache.encode("8x")
    return payload, compress_payload(payload, artifacts)


def test_the_stage_gives_the_payload_back_byte_for_byte_in_fewer_bytes(shipped, artifacts):
    payload, blob = shipped
    assert decompress_payload(blob, artifacts).to_bytes() == payload.to_bytes()
    codes = sum(layer.key_codes.numel() + layer.value_codes.numel() for layer in payload.layers)
    # The rest of the payload rides along; the codes themselves shrink (by 9% on this text).
    assert len(blob) < len(payload.to_bytes()) - codes // 16


def test_decompressed_codes_go_to_the_decoder_unpacked_and_are_packed_only_when_written(smollm2, shipped, artifacts):
    """The stage hands the decoder its rows: rebuilding a cache from a decompressed payload packs nothing, gives the
    cache the plain payload gives, bit for bit, and the payload still writes out (and compresses again) as it was."""
    model, _ = smollm2
    payload, blob = shipped
    decompressed = decompress_payload(blob, artifacts)
    held = [layer for layer in decompressed.layers if isinstance(layer, UnpackedLayerCodes)]
    assert len(held) == len(artifacts.plan(payload.operating_point).units)
    with torch.inference_mode():
        plain = SCDCache.from_payload(payload, artifacts, model)
        rebuilt = SCDCache.from_payload(decompressed, artifacts, model)
    assert not any({"key_codes", "value_codes"} & vars(layer).keys() for layer in held)  # never packed
    for mine, theirs in zip(rebuilt.layers, plain.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert compress_payload(decompressed, artifacts) == blob
    assert decompressed.to_bytes() == payload.to_bytes()
    assert all({"key_codes", "value_codes"} <= vars(layer).keys() for layer in held)  # packed to be written


def test_codes_kept_as_rows_compress_and_write_out_as_packed_ones_do(smollm2, artifacts):
    """`encode(packed=False)` holds each unit's codes as rows for the stage: the same compressed bytes and the same
    payload bytes as packed codes, and the rows go to zstd without being packed."""
    model, tokenizer = smollm2
    ids = tokenizer(evaluation_texts()[2], return_tensors="pt", add_special_tokens=False)["input_ids"][:, :300]
    with torch.inference_mode():
        cache = SCDCache(artifacts, model)
        model(ids, **with_cache(model, cache))
        packed, rows = cache.encode("8x"), cache.encode("8x", packed=False)
    held = [layer for layer in rows.layers if isinstance(layer, UnpackedLayerCodes)]
    assert len(held) == len(artifacts.plan("8x").units)
    assert compress_payload(rows, artifacts) == compress_payload(packed, artifacts)
    assert not any({"key_codes", "value_codes"} & vars(layer).keys() for layer in held)  # never packed
    assert rows.to_bytes() == packed.to_bytes()


def test_a_chat_prompt_shrinks_and_a_payload_with_nothing_to_code_is_stored_as_it_is(smollm2, artifacts, chat_ids):
    model, _ = smollm2
    blobs = {}
    for name, ids in (("chat", chat_ids), ("sink only", chat_ids[:, :3])):  # 3 tokens: all exact sink, no codes
        with torch.inference_mode():
            cache = SCDCache(artifacts, model)
            model(ids, **with_cache(model, cache))
            payload = cache.encode("8x")
        blobs[name] = blob = compress_payload(payload, artifacts)
        assert decompress_payload(blob, artifacts).to_bytes() == payload.to_bytes(), name
        if name == "chat":  # a frame per width pays from a few dozen tokens
            assert len(blob) < len(payload.to_bytes()), (len(blob), len(payload.to_bytes()))
    tensors, metadata = _body(blobs["sink only"])
    assert json.loads(metadata["hf-scd"])["coded"] == "no" and not tensors["codes"].numel()
    assert not tensors["frames"].numel()
    stray = tensors | _frames([torch.ones(3, dtype=torch.uint8)])
    with pytest.raises(CorruptPayloadError, match="uncoded"):
        decompress_payload(_sealed(stray, metadata), artifacts)


def _body(blob: bytes) -> tuple[dict, dict]:
    body = blob[_HEADER.size :]
    (length,) = struct.unpack_from("<Q", body)
    return st_load(body), json.loads(body[8 : 8 + length])["__metadata__"]


def _frame(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(zstandard.ZstdCompressor().compress(data)), dtype=torch.uint8)


def _frames(frames: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The body tensors of these zstd frames."""
    return {"codes": torch.cat(frames), "frames": torch.tensor([f.numel() for f in frames], dtype=torch.int32)}


def _sealed(tensors: dict, metadata: dict, version: int = FORMAT_VERSION) -> bytes:
    return seal(st_save(tensors, metadata=metadata), MAGIC, version)


def test_damaged_truncated_and_foreign_bytes_are_typed_errors(shipped, artifacts):
    payload, blob = shipped
    flipped = bytearray(blob)
    flipped[-5] ^= 1
    with pytest.raises(CorruptPayloadError, match="checksum"):
        decompress_payload(bytes(flipped), artifacts)
    with pytest.raises(TruncatedPayloadError):
        decompress_payload(blob[: len(blob) // 2], artifacts)
    with pytest.raises(CorruptPayloadError, match="magic"):
        decompress_payload(b"X" + blob[1:], artifacts)
    tensors, metadata = _body(blob)
    with pytest.raises(PayloadVersionError, match="version 9"):
        decompress_payload(_sealed(tensors, metadata, version=9), artifacts)
    # Checksums match from here on: what is wrong is the content.
    lengths = tensors["frames"].tolist()
    frames = list(tensors["codes"].split(lengths))  # one zstd frame per bit width, in increasing width
    first = zstandard.ZstdDecompressor().decompress(frames[0].numpy().tobytes())
    for frame, why in (
        (frames[0][: lengths[0] // 2], "not a zstd frame|do not decompress"),
        (_frame(first[:-1]), "declare"),
        (_frame(first + b"\0"), "declare"),
        (torch.cat([frames[0], frames[0][:7]]), "do not decompress"),
        (torch.zeros(8, dtype=torch.uint8), "not a zstd frame"),
    ):
        with pytest.raises(CorruptPayloadError, match=why):
            decompress_payload(_sealed(tensors | _frames([frame, *frames[1:]]), metadata), artifacts)
    with pytest.raises(CorruptPayloadError, match="frames of codes"):
        decompress_payload(_sealed(tensors | _frames(frames[:-1]), metadata), artifacts)
    for bad in (tensors["frames"] + 1, -tensors["frames"], tensors["frames"][:-1]):
        with pytest.raises(CorruptPayloadError, match="frame lengths"):
            decompress_payload(_sealed(tensors | {"frames": bad}, metadata), artifacts)
    with pytest.raises(CorruptPayloadError, match="1-D bytes"):
        decompress_payload(_sealed(tensors | {"codes": tensors["codes"].to(torch.int32)}, metadata), artifacts)
    for foreign, why in ((json.dumps({"format": "other"}), "entropy format"), ("[1, 2]", "not an object")):
        with pytest.raises(CorruptPayloadError, match=why):
            decompress_payload(_sealed(tensors, {"hf-scd": foreign}), artifacts)
    unsaid = json.loads(metadata["hf-scd"]) | {"coded": "maybe"}
    with pytest.raises(CorruptPayloadError, match="whether"):
        decompress_payload(_sealed(tensors, {"hf-scd": json.dumps(unsaid)}), artifacts)
    with pytest.raises(PayloadLimitError, match="expand to"):  # a receiver's cap, before decompressing
        decompress_payload(blob, artifacts, max_bytes=len(blob))
    assert decompress_payload(blob, artifacts, max_bytes=2 * len(payload.to_bytes())).to_bytes() == payload.to_bytes()
    other = SCDArtifacts.from_pretrained(REPO / "hub_artifacts" / "qwen2.5-coder-0.5b-instruct")
    with pytest.raises(ArtifactMismatchError):
        decompress_payload(blob, other)


@pytest.mark.parametrize("bits", range(1, 9))
def test_symbol_bytes_hold_8_over_width_codes_each_and_give_them_back(bits):
    codes = torch.randint(0, 1 << bits, (1001,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    data = _symbol_bytes(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == -(-1001 // (8 // bits))
    assert torch.equal(_codes_of_bytes(data, 1001, bits), codes)
    first = int(data[0])  # the first code in the lowest bits
    assert first & ((1 << bits) - 1) == int(codes[0])


def test_a_units_frame_round_trips_and_a_coded_frame_where_no_unit_ends_is_refused(shipped, artifacts):
    payload, _ = shipped
    plan = artifacts.plan(payload.operating_point)
    unit = plan.units[0]
    last, tokens = unit.members[-1], payload.head.num_tokens
    body = compress_layer(payload.layers[last], plan, last)
    assert body.startswith(MAGIC) and len(body) < len(layer_to_bytes(payload.layers[last]))
    codes = decompress_layer(body, plan, last, tokens, max_bytes=len(body) * 4)
    assert layer_to_bytes(codes) == layer_to_bytes(payload.layers[last])
    assert isinstance(codes, UnpackedLayerCodes) and compress_layer(codes, plan, last) == body  # from its rows
    first = unit.members[0]  # layer 0 only feeds a joint unit: its frame stays plain, and a coded one is refused
    assert compress_layer(payload.layers[first], plan, first) == layer_to_bytes(payload.layers[first])
    with pytest.raises(PayloadLimitError):
        decompress_layer(body, plan, last, tokens, max_bytes=len(body) // 2)
    with pytest.raises(CorruptPayloadError, match="carries no Reuse unit"):
        decompress_layer(body, plan, first, tokens, max_bytes=len(body) * 4)


def test_the_throughput_benchmarks_stage_arms_rebuild_what_its_plain_arms_rebuild(smollm2, artifacts):
    """`hf_scd.eval.codec_speed --entropy` times the stage's own round trips, one-shot and streamed: each must rebuild
    the cache its plain arm rebuilds, bit for bit, from fewer bytes."""
    from hf_scd.eval import codec_speed

    model, tokenizer = smollm2
    ids = tokenizer(evaluation_texts()[1], return_tensors="pt", add_special_tokens=False)["input_ids"][:, :400]
    with torch.inference_mode():
        cache = codec_speed.prefilled(model, artifacts, ids)
        payload = cache.encode("8x")
        rebuilt = {}
        for entropy in (False, True):
            blob = codec_speed.encode(cache, "8x", entropy)
            bodies = codec_speed.stream_encode(cache, "8x", entropy)
            rebuilt[entropy] = (
                len(blob),
                sum(map(len, bodies)),
                codec_speed.decode(blob, artifacts, model, entropy),
                codec_speed.stream_decode(payload, bodies, artifacts, model, entropy),
            )
    (plain_size, plain_stream, plain, plain_streamed), (size, stream, coded, coded_streamed) = rebuilt.values()
    assert size < plain_size and stream < plain_stream
    for got in (coded, coded_streamed, plain_streamed):
        for mine, theirs in zip(got.layers, plain.layers, strict=True):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
