"""A payload comes from a peer: whatever bytes arrive, the consumer raises a typed `SCDError` or rebuilds a finite
cache. Seeded fuzzing of a real SmolLM2 payload; `HF_SCD_FUZZ_INPUTS=100000` runs the long campaign (default 600),
`HF_SCD_FUZZ_SEED` picks another seed, `HF_SCD_FUZZ_GENERATE=2000` continues generation from that many accepted mutants
(default 12)."""

import json
import os
import random
import struct
import zlib

import pytest
import torch

from hf_scd import (
    ArtifactMismatchError,
    CorruptPayloadError,
    PayloadLimitError,
    SCDCache,
    SCDError,
    SCDPayload,
)
from hf_scd.compat import with_cache
from hf_scd.payload import _HEADER, FORMAT_VERSION, MAGIC, METADATA_KEY

FUZZ_INPUTS = int(os.environ.get("HF_SCD_FUZZ_INPUTS", "600"))
FUZZ_SEED = int(os.environ.get("HF_SCD_FUZZ_SEED", "0"))  # long campaigns split across processes by seed
FUZZ_GENERATE = int(os.environ.get("HF_SCD_FUZZ_GENERATE", "12"))  # mutants that must also generate 4 tokens


@pytest.fixture(scope="module")
def shipped(smollm2, artifacts):
    model, _ = smollm2
    with torch.inference_mode():
        cache = SCDCache(artifacts, model, point="4x")
        model(torch.arange(300, 324)[None], **with_cache(model, cache))
        return cache.encode()


def _seal(body: bytes) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body), len(body)) + body


def _split(blob: bytes) -> tuple[dict, bytes]:
    body = blob[_HEADER.size :]
    (header_len,) = struct.unpack_from("<Q", body)
    return json.loads(body[8 : 8 + header_len]), body[8 + header_len :]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return _seal(struct.pack("<Q", len(raw)) + raw + data)


def _mutant(blob: bytes, rng: random.Random) -> bytes:
    """One mutation of a valid payload, resealed (valid CRC) so the checks behind the CRC are what is exercised."""
    kind = rng.randrange(6)
    header, data = _split(blob)
    if kind == 0:  # flip bytes anywhere in the tensor data: codes, scales, ids, positions, mask, exact K/V
        data = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return _join(header, bytes(data))
    if kind == 1:  # flip bytes of the exact (bf16) sink K/V only: non-finite values must never be accepted
        name = rng.choice(["exact_keys", "exact_values"])
        start, end = header[name]["data_offsets"]
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(start, end)] ^= rng.choice([0x7F, 0x80, 0xFF, 1 << rng.randrange(8)])
        return _join(header, bytes(data))
    names = [name for name in header if name != "__metadata__"]
    if kind == 2:  # a tensor's dtype, shape or offsets
        entry = header[rng.choice(names)]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        choices = {
            "dtype": ["U8", "I32", "BF16", "F32", "I64", "BOOL", "F4", "F8_E8M0", "C64", None],
            "shape": [[], [0], [1, 0], [0, 2**63], [2**31, 2**31], [-1, 3], [3], entry["shape"][::-1], "x"],
            "data_offsets": [[0, 0], [0, 2**40], [5, 2], [-1, 3], None, [0]],
        }
        entry[field] = rng.choice(choices[field])
        return _join(header, data)
    metadata = json.loads(header["__metadata__"][METADATA_KEY])
    if kind == 3:  # a metadata value: widths, point, artifacts id, format
        key = rng.choice(sorted(metadata))
        metadata[key] = rng.choice(
            ["", "-1,2", "0", "1," * 40, "4x", "99x", "abc", metadata[key][:-1], metadata[key] + ",0", "1e9"]
        )
        header["__metadata__"][METADATA_KEY] = json.dumps(metadata)
        return _join(header, data)
    if kind == 4:  # the metadata container itself
        header["__metadata__"] = rng.choice([None, {}, {METADATA_KEY: "[]"}, {METADATA_KEY: "{"}, [1]])
        return _join(header, data)
    cut = rng.randrange(len(blob))  # truncated, or extended, without resealing
    return blob[:cut] if rng.random() < 0.5 else blob + bytes(rng.randrange(1, 64))


@torch.inference_mode()
def test_fuzzed_payloads_are_typed_errors_or_finite_caches(smollm2, artifacts, shipped):
    model, _ = smollm2
    blob, rng = shipped.to_bytes(), random.Random(FUZZ_SEED)
    outcomes = {"typed": 0, "rebuilt": 0}
    for _ in range(FUZZ_INPUTS):
        mutant = _mutant(blob, rng)
        try:
            cache = SCDCache.from_payload(SCDPayload.from_bytes(mutant), artifacts, model)
        except SCDError:
            outcomes["typed"] += 1
            continue
        outcomes["rebuilt"] += 1
        for layer in cache.layers:
            assert layer.keys.isfinite().all() and layer.values.isfinite().all()
        cache.close()
    print(f"fuzzed {FUZZ_INPUTS} payloads: {outcomes}")  # shown with -s, for the long campaign's figures
    # Both outcomes occur: the fuzzer reaches past the checks (a flipped code byte is still a valid code).
    assert outcomes["typed"] > FUZZ_INPUTS // 4 and outcomes["rebuilt"] > 0, outcomes


@torch.inference_mode()
def test_fuzzed_payloads_that_rebuild_also_generate(smollm2, artifacts, shipped):
    """A mutant the consumer accepts is a cache generate() can continue from: 4 greedy tokens, finite logits."""
    model, _ = smollm2
    blob, rng = shipped.to_bytes(), random.Random(FUZZ_SEED + 1)
    generated = 0
    while generated < FUZZ_GENERATE:
        try:
            cache = SCDCache.from_payload(SCDPayload.from_bytes(_mutant(blob, rng)), artifacts, model)
        except SCDError:
            continue
        ids = torch.cat([cache.input_ids, torch.tensor([[7]])], 1)
        mask = torch.cat([cache.attention_mask, torch.ones(1, 1, dtype=torch.long)], 1)
        out = model.generate(
            ids, attention_mask=mask, **with_cache(model, cache), max_new_tokens=4, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        assert out.sequences.shape[1] == ids.shape[1] + 4 and all(step.isfinite().all() for step in out.logits)
        cache.close()
        generated += 1
    print(f"generated from {generated} accepted mutants")


@torch.inference_mode()
@pytest.mark.parametrize("layer_index", [3, 4])  # inside a unit of 5 layers, and its last, which carries the codes
def test_scale_widths_must_match_the_units_blocks(smollm2, artifacts, shipped, layer_index):
    model, _ = smollm2
    payload = SCDPayload.from_bytes(shipped.to_bytes())
    layer = payload.layers[layer_index]
    assert layer.key_scales.shape[1] == (layer_index == 4)  # one scale code per token for the unit's joint block
    layer.key_scales = torch.zeros(layer.key_scales.shape[0], 3, dtype=torch.uint8)  # one per KV head instead
    payload._wire = None
    with pytest.raises(ArtifactMismatchError, match="bit allocation"):
        SCDCache.from_payload(payload, artifacts, model)


@torch.inference_mode()
def test_ids_positions_and_size_are_bounded_before_decoding(smollm2, artifacts, shipped):
    model, _ = smollm2
    payload = SCDPayload.from_bytes(shipped.to_bytes())
    payload.input_ids[0, 5] = model.config.vocab_size
    with pytest.raises(CorruptPayloadError, match="vocabulary"):
        SCDCache.from_payload(payload, artifacts, model)
    payload = SCDPayload.from_bytes(shipped.to_bytes())
    payload.position_ids += model.config.max_position_embeddings
    with pytest.raises(PayloadLimitError, match="allows positions below"):
        SCDCache.from_payload(payload, artifacts, model)
    with pytest.raises(PayloadLimitError, match="max_kv_bytes"):
        SCDCache.from_payload(SCDPayload.from_bytes(shipped.to_bytes()), artifacts, model, max_kv_bytes=1024)


@torch.inference_mode()
def test_a_one_token_prompt_ships_its_sink_alone(smollm2, artifacts):
    """With one exact sink token, a one-token prompt has no coded rows: it ships and continues like the oracle."""
    model, _ = smollm2
    cache = SCDCache(artifacts, model)
    model(torch.tensor([[42]]), **with_cache(model, cache))
    rebuilt = SCDCache.from_payload(SCDPayload.from_bytes(cache.encode().to_bytes()), artifacts, model)
    prompt = torch.tensor([[42, 7]])
    out = model.generate(prompt, **with_cache(model, rebuilt), max_new_tokens=3, do_sample=False)
    assert out.tolist() == model.generate(prompt, max_new_tokens=3, do_sample=False).tolist()
