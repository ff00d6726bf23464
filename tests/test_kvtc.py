"""KVTC baseline: bit allocation, quantizers and packing, byte accounting, the exact window, and name parsing.

The fast checks fit on a tiny random Llama (2 layers, 1 KV head of 32 dims: 64-dim vectors in groups of 16); the one
real-model check fits on SmolLM2 and is slow.
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest
import torch
from conftest import SMOLLM2_ARTIFACTS
from transformers import LlamaConfig, LlamaForCausalLM

from hf_scd.cli import main
from hf_scd.eval import KIVI, KVTC, KVTCBasis, evaluation_texts, parse_kvtc_name
from hf_scd.eval.corpus import calibration_documents, calibration_texts
from hf_scd.eval.kvtc import (
    BITS,
    GroupCoder,
    allocate_bits,
    content_vectors,
    dequantize,
    group_bytes,
    pack,
    quantize,
    rotary,
    unpack,
)
from hf_scd.prefill import prefill

GROUP = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def basis(model):
    documents = torch.randint(0, 64, (6, 160), generator=torch.Generator().manual_seed(1)).tolist()
    return KVTCBasis.fit(model, documents, group_size=GROUP)


def _relative_error(reference, layers) -> float:
    num = den = 0.0
    for ref, shipped in zip(reference.layers, layers, strict=True):
        for a, b in zip((ref.keys, ref.values), shipped, strict=True):
            num += (a.float() - b.float()).pow(2).sum().item()
            den += a.float().pow(2).sum().item()
    return math.sqrt(num / den)


# allocation


def _size(bits) -> int:
    return sum(group_bytes(b, GROUP) for b in bits)


def test_allocation_is_the_exact_optimum_within_budget():
    rng = np.random.default_rng(0)
    distortion = np.sort(rng.uniform(0.1, 1.0, (4, len(BITS))), axis=1)[:, ::-1] * [[8], [4], [2], [1]]

    def cost(bits) -> float:
        return sum(distortion[group, BITS.index(b)] for group, b in enumerate(bits))

    for budget in (0, 10, 25, 40, 77, 200):
        bits = allocate_bits(distortion, GROUP, budget)
        assert _size(bits) <= budget
        feasible = [choice for choice in itertools.product(BITS, repeat=4) if _size(choice) <= budget]
        assert cost(bits) == pytest.approx(min(map(cost, feasible)))


def test_allocation_gives_high_variance_groups_more_bits():
    # Error falls 4x per extra bit of a uniform quantizer (2 -> 4 bits: 16x; FP8 counted as 8 bits).
    variances = np.array([100.0, 30.0, 10.0, 3.0, 1.0, 0.3])
    distortion = variances[:, None] * np.array([1.0, 4.0**-2, 4.0**-4, 4.0**-8])
    assert allocate_bits(distortion, GROUP, 0) == (0,) * 6
    assert allocate_bits(distortion, GROUP, 10**4) == (8,) * 6
    for budget in (6, 20, 40, 70, 110):
        bits = allocate_bits(distortion, GROUP, budget)
        assert list(bits) == sorted(bits, reverse=True), (budget, bits)
        assert _size(bits) <= budget


# quantizers and packing


@pytest.mark.parametrize("bits", BITS[1:])
def test_quantize_pack_roundtrip(bits):
    x = torch.randn(3, 5, GROUP) * torch.logspace(-3, 2, 5)[:, None]
    x[0, 0] = 0  # an all-zero group decodes to zeros
    codes, scale = quantize(x, bits)
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float16 and scale.shape == (3, 5)
    packed = pack(codes, bits)
    assert len(packed) == x.numel() * bits // 8
    assert torch.equal(unpack(packed, bits, codes.shape), codes)
    error = (dequantize(codes, scale, bits) - x).abs()
    assert torch.all(error[0, 0] == 0)
    limit = 2**-4 if bits == 8 else 2.0 ** (1 - bits)  # FP8: 3 mantissa bits; int: half a step of 2 absmax / 2**b
    assert torch.all(error <= limit * x.abs().amax(-1, keepdim=True) * 1.01)


# the coder on a tiny model


def test_basis_components_are_orthonormal_and_sorted(basis):
    for kind in (basis.keys, basis.values):
        eye = torch.eye(kind.components.shape[0])
        assert torch.allclose(kind.components.T @ kind.components, eye, atol=1e-4)
        dropped = kind.distortion[:, 0]  # the held-out variance of each group
        assert dropped[:2].sum() > dropped[-2:].sum()


def test_nothing_coded_keeps_sink_and_recent_exact_and_counts_them(model, basis):
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :10] = 0  # row 0: 30 real tokens after left padding
    coder = KVTC(model, basis, ratio=10**6, recent_tokens=8)
    assert coder.keys.bits == coder.values.bits == (0,) * 4
    with torch.inference_mode():
        cache = prefill(model, ids, mask)
        layers, nbytes = coder.roundtrip_layers(cache, mask)
    exact = (4 + 8) * 2  # per row
    empty = len(zlib.compress(b""))  # each row's K and V streams carry no codes, and no scales
    assert nbytes == exact * 64 * 2 * 2 + 2 * 2 * empty
    for ref, shipped in zip(cache.layers, layers, strict=True):
        for a, b in zip((ref.keys, ref.values), shipped, strict=True):
            assert torch.all(b[0, :, :10] == 0)  # padding is not shipped
            for row, start in ((0, 10), (1, 0)):
                for tokens in (slice(start, start + 4), slice(-8, None)):
                    assert torch.equal(b[row, :, tokens], a[row, :, tokens].to(torch.bfloat16).float())
                assert not torch.allclose(b[row, :, start + 4 : -8], a[row, :, start + 4 : -8], atol=1e-3)


def test_generous_budget_is_all_fp8_and_near_exact(model, basis):
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        cache = prefill(model, ids, None)
        errors = {}
        for ratio in (1, 4, 16):
            coder = KVTC(model, basis, ratio=ratio, recent_tokens=0)
            errors[ratio] = _relative_error(cache, coder.roundtrip_layers(cache, None)[0])
    assert KVTC(model, basis, ratio=1).keys.bits == (8,) * 4
    assert errors[1] < 0.03 < errors[16] and errors[1] < errors[4] < errors[16]


def test_bytes_are_the_deflated_codes_plus_scales(model, basis):
    coder = GroupCoder.for_budget(basis.keys, GROUP, target=40)
    kept = [b for b in coder.bits if b]
    x = basis.keys.held_out[:50]
    payload, scales = coder.encode(x)
    assert len(zlib.decompress(payload)) == 50 * sum(GROUP * b // 8 for b in kept)
    assert len(scales) == 50 * len(kept) * 2
    # the roundtrip counts exactly these streams besides the exact tokens
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(4))
    kvtc = KVTC(model, basis, ratio=3, recent_tokens=6)
    with torch.inference_mode():
        cache = prefill(model, ids, None)
        _, nbytes = kvtc.roundtrip_layers(cache, None)
        vectors = content_vectors(cache, *rotary(kvtc.handle, torch.ones_like(ids)))
    coded = [len(part) for c, v in zip((kvtc.keys, kvtc.values), vectors, strict=True) for part in c.encode(v[0, 4:24])]
    assert nbytes == 10 * 64 * 2 * 2 + sum(coded)


def test_target_ratio_is_met_on_calibration_tokens(basis):
    for ratio in (2, 4, 8):
        target = 64 * 2 / ratio
        coder = GroupCoder.for_budget(basis.values, GROUP, target)
        size = sum(map(len, coder.encode(basis.values.held_out))) / basis.values.held_out.shape[0]
        assert size == pytest.approx(target, rel=0.15)


# names


def test_names():
    assert parse_kvtc_name("kvtc-8x") == (8.0, 128)
    assert parse_kvtc_name("kvtc-2.5x-w16") == (2.5, 16)
    for bad in ("kvtc-8", "kvtc-x", "kvtc-eightx", "kvtc-8x-16", "kvtc-0.5x"):
        with pytest.raises(ValueError, match="kvtc"):
            parse_kvtc_name(bad)


def test_eval_rejects_a_bad_kvtc_name_before_loading_a_model():
    with pytest.raises(SystemExit, match="kvtc-<ratio>x"):
        main(["eval", "--artifacts", str(SMOLLM2_ARTIFACTS), "--baselines", "kivi-int4", "kvtc-fast"])


# the real model


def test_kvtc_on_smollm2_beats_kivi_int2_at_a_higher_ratio(smollm2):
    model, tokenizer = smollm2
    basis = KVTCBasis.fit(model, calibration_documents(tokenizer, calibration_texts(), 2048, 1024))
    ids = torch.tensor([tokenizer(evaluation_texts()[1], add_special_tokens=False)["input_ids"][:256]])
    with torch.inference_mode():
        cache = prefill(model, ids, None)
        kivi, kivi_bytes = KIVI(bits=2).roundtrip_layers(cache, None)
        kvtc, kvtc_bytes = KVTC(model, basis, ratio=8, recent_tokens=0).roundtrip_layers(cache, None)
    assert kvtc_bytes < kivi_bytes
    assert _relative_error(cache, kvtc) < _relative_error(cache, kivi)
