"""The Triton kernels against the torch reference in hf_scd.codec, on random coders and caches of odd sizes.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py before
anything imports triton); on a CUDA machine the same tests run the compiled kernels on the GPU.

Tolerances, and why: the kernels' dot products sum in another order than torch's einsum, so a token-head's RMS can
land on the other side of a scale-code boundary (scale code off by 1), and a coefficient exactly at a quantizer
boundary can round the other way (code off by 1), the more so as the encoder is carried in two bf16 pieces (16
bits). Both are measured and bounded (`MAX_SCALE_MISMATCH`, `MAX_CODE_MISMATCH`); everything else is bit-exact.
Decoded K/V are compared up to one rounding step of the output dtype (the interpreter's conversion truncates) plus
`PIECE_ATOL` of the data's magnitude: the error of the bf16 pieces of the decoder that the dtype is decoded with
(`kernels._tables.DECODER_PIECES`; the interpreter computes the same products as a GPU).
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 (conftest.py sets it)", allow_module_level=True)
pytest.importorskip("triton")

from hf_scd import codec, codes  # noqa: E402
from hf_scd.kernels import available  # noqa: E402
from hf_scd.kernels.accuracy import random_cache, random_coder, random_rope  # noqa: E402
from hf_scd.kernels.decode import decode_rows  # noqa: E402
from hf_scd.kernels.encode import encode_rows  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
MAX_SCALE_MISMATCH = 0.02  # fraction of token-heads whose scale code is off by 1 (never more than 1)
MAX_CODE_MISMATCH = 2e-3  # fraction of codes (in token-heads with equal scale codes) off by 1 (never more than 1)
# Beyond the output's rounding, / max |reference|: one piece of a bf16 output measured ~2^-9, two of fp16 ~2^-18.5,
# three of fp32 ~2^-22.
PIECE_ATOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-16, torch.float32: 2.0**-20}

CASES = [
    # batch, seq, heads, dim, coded rows, cache dtype, layers
    pytest.param(2, 23, 3, 64, 37, torch.bfloat16, 3, id="N37-H3-d64-bf16-L3"),
    pytest.param(1, 9, 2, 128, 5, torch.float32, 2, id="N5-H2-d128-fp32-L2"),
    pytest.param(3, 7, 1, 256, 17, torch.float16, 1, id="N17-H1-d256-fp16-L1"),
]


def _setup(batch, seq, heads, dim, n_rows, dtype, layers, seed):
    """Per layer keys and values, and (key, value) coders; the last of several layers codes only half the
    components (its tables are padded to the others' width)."""
    generator = torch.Generator().manual_seed(seed)
    comps = [dim // 2 if layers > 1 and layer == layers - 1 else dim for layer in range(layers)]
    coders = [
        (
            random_coder(heads, dim, generator, heads > 1, c, DEVICE),
            random_coder(heads, dim, generator, False, c, DEVICE),
        )
        for c in comps
    ]
    keys = [random_cache(batch, heads, seq, dim, dtype, generator, DEVICE) for _ in range(layers)]
    values = [random_cache(batch, heads, seq, dim, dtype, generator, DEVICE) for _ in range(layers)]
    cos, sin = random_rope(batch, seq, dim, generator, DEVICE)
    rows = torch.randperm(batch * seq, generator=generator)[:n_rows].to(DEVICE)
    return units(keys), units(values), cos, sin, rows, coders


def units(layers) -> list[list[torch.Tensor]]:
    """Layers as Reuse units of one layer each: what the kernels code."""
    return [[layer] for layer in layers]


def _check_codes(got_codes, got_scales, ref_codes, ref_scales, code: codes.TransformCode) -> float:
    """Assert the kernel's codes match the reference's up to the stated off-by-one fractions; return the code
    mismatch fraction."""
    assert got_codes.dtype == torch.uint8 and got_scales.dtype == torch.uint8
    assert got_codes.shape == ref_codes.shape and got_scales.shape == ref_scales.shape
    scale_diff = got_scales.int() - ref_scales.int()
    assert scale_diff.abs().max() <= 1
    assert (scale_diff != 0).float().mean() <= MAX_SCALE_MISMATCH
    got, ref = codec.unpack_codes(got_codes, code.layout), codec.unpack_codes(ref_codes, code.layout)
    # Padding bits are zero and the layout is the reference's: repacking the unpacked codes reproduces the bytes.
    assert torch.equal(codec.pack_codes(got, code.layout), got_codes)
    same_scale = (scale_diff == 0).unsqueeze(-1).expand_as(got)
    code_diff = (got - ref)[same_scale]
    assert code_diff.numel() == 0 or code_diff.abs().max() <= 1
    mismatch = float((code_diff != 0).float().mean()) if code_diff.numel() else 0.0
    assert mismatch <= MAX_CODE_MISMATCH
    return mismatch


def _check_unit_codes(got_unit: codes.RowCodes, ref_unit: codes.RowCodes, coders: codes.CoderPair) -> None:
    """`_check_codes` on a unit's keys and values; prints both mismatch fractions."""
    key_code, value_code = coders
    key_mismatch = _check_codes(got_unit[0], got_unit[1], ref_unit[0], ref_unit[1], key_code)
    value_mismatch = _check_codes(got_unit[2], got_unit[3], ref_unit[2], ref_unit[3], value_code)
    print(f"code mismatch fraction: keys {key_mismatch:.2e}, values {value_mismatch:.2e}")


PARAMS = ("batch", "seq", "heads", "dim", "n_rows", "dtype", "layers")


@pytest.mark.parametrize(PARAMS, CASES)
def test_encode_matches_reference(batch, seq, heads, dim, n_rows, dtype, layers):
    keys, values, cos, sin, rows, coders = _setup(batch, seq, heads, dim, n_rows, dtype, layers, seed=dim)
    got = encode_rows(keys, values, cos, sin, rows, coders)
    ref = codec.encode_rows(keys, values, cos, sin, rows, coders)
    assert len(got) == layers
    for got_layer, ref_layer, coder in zip(got, ref, coders, strict=True):
        _check_unit_codes(got_layer, ref_layer, coder)
        if heads > 1:  # heads with no bits get scale code 0 (RMS 0, clamped to 2^-8) in both
            assert (got_layer[1][:, -1] == 0).all() and (ref_layer[1][:, -1] == 0).all()


def _layer_codes(encoded: list[codes.RowCodes]) -> list[codes.LayerCodes]:
    return [codes.LayerCodes(*layer, None, None, None, None) for layer in encoded]


@pytest.mark.parametrize(PARAMS, CASES)
def test_decode_matches_reference_and_writes_only_rows(batch, seq, heads, dim, n_rows, dtype, layers):
    keys, values, cos, sin, rows, coders = _setup(batch, seq, heads, dim, n_rows, dtype, layers, seed=dim + 1)
    codes = _layer_codes(codec.encode_rows(keys, values, cos, sin, rows, coders))
    poison = torch.full((2, 2, layers, batch, heads, seq, dim), float("nan"), dtype=dtype, device=DEVICE)
    (got_keys, got_values), (ref_keys, ref_values) = poison.unbind(0)
    decode_rows(codes, cos, sin, rows, coders, units(got_keys.unbind(0)), units(got_values.unbind(0)))
    codec.decode_rows(codes, cos, sin, rows, coders, units(ref_keys.unbind(0)), units(ref_values.unbind(0)))
    written = torch.zeros(batch * seq, dtype=torch.bool, device=DEVICE)
    written[rows] = True
    written = written.view(1, batch, 1, seq, 1).expand_as(got_keys)
    for got, ref in ((got_keys, ref_keys), (got_values, ref_values)):
        assert got[written].isfinite().all() and got[~written].isnan().all()
        got, ref = got[written].float(), ref[written].float()
        err = (got - ref).abs()
        assert (err <= ref.abs() * torch.finfo(dtype).eps + PIECE_ATOL[dtype] * ref.abs().max()).all()


def test_layers_in_separate_allocations_match_one_launch():
    """Layers whose tensors do not share strides (a launch each) give the same codes and outputs as one launch."""
    keys, values, cos, sin, rows, coders = _setup(1, 13, 2, 64, 11, torch.bfloat16, 2, seed=7)
    contiguous_keys = [[keys[0][0].contiguous()], keys[1]]  # strides now differ between the layers
    together, apart = (
        encode_rows(keys, values, cos, sin, rows, coders),
        encode_rows(contiguous_keys, values, cos, sin, rows, coders),
    )
    for a, b in zip(together, apart, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    codes = _layer_codes(together)
    out = torch.zeros(2, 2, 1, 2, 13, 64, dtype=torch.bfloat16, device=DEVICE)
    decode_rows(codes, cos, sin, rows, coders, units(out[0].unbind(0)), units(out[1].unbind(0)))
    separate = [torch.zeros(1, 2, 13, 64, dtype=torch.bfloat16, device=DEVICE) for _ in range(3)]
    separate.append(torch.zeros(1, 13, 2, 64, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2))
    decode_rows(codes, cos, sin, rows, coders, units(separate[:2]), units(separate[2:]))
    assert all(torch.equal(a, b) for a, b in zip(out.reshape(4, 1, 2, 13, 64), separate, strict=True))


def test_empty_rows_and_available():
    keys, values, cos, sin, _, coders = _setup(1, 5, 2, 64, 0, torch.bfloat16, 2, seed=3)
    rows = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    encoded = encode_rows(keys, values, cos, sin, rows, coders)
    for (key_codes, _, _, value_scales), (key_code, _) in zip(encoded, coders, strict=True):
        assert key_codes.shape == (0, key_code.layout.bytes_per_token) and value_scales.shape == (0, 2)
    out = [torch.zeros_like(unit[0]) for unit in keys + values]
    decode_rows(_layer_codes(encoded), cos, sin, rows, coders, units(out[:2]), units(out[2:]))
    assert all((o == 0).all() for o in out)
    assert available() == ON_GPU


def test_round_trip_through_kernels_alone_matches_reference_round_trip():
    """Encode then decode with the kernels only (all rows, 8 bits): the reconstruction error is the reference's."""
    keys, values, cos, sin, rows, coders = _setup(1, 19, 2, 64, 19, torch.float32, 1, seed=5)
    for code in coders[0]:
        code.bits = torch.full_like(code.bits, 8)
    outputs = []
    for encode, decode in ((encode_rows, decode_rows), (codec.encode_rows, codec.decode_rows)):
        codes = _layer_codes(encode(keys, values, cos, sin, rows, coders))
        out_keys, out_values = torch.empty_like(keys[0][0]), torch.empty_like(values[0][0])
        decode(codes, cos, sin, rows, coders, [[out_keys]], [[out_values]])
        outputs.append(
            [
                float((got - ref).pow(2).mean() / ref.pow(2).mean())
                for got, ref in ((out_keys, keys[0][0]), (out_values, values[0][0]))
            ]
        )
    (kernel_key, kernel_value), (ref_key, ref_value) = outputs
    assert kernel_key == pytest.approx(ref_key, rel=0.02) and kernel_value == pytest.approx(ref_value, rel=0.02)
    assert max(kernel_key, kernel_value) < 1e-2


# The block path (`hf_scd.kernels.blocks`): units of several layers coded as one joint block, or as several blocks.
BLOCK_CASES = [
    # batch, seq, heads, dim, coded rows, cache dtype, units, members, blocks per unit
    pytest.param(2, 11, 2, 32, 19, torch.bfloat16, 2, 2, 1, id="joint-U2-M2-H2-d32-bf16"),
    pytest.param(1, 9, 1, 64, 7, torch.float32, 1, 3, 3, id="per-head-U1-M3-H1-d64-fp32"),
    pytest.param(3, 5, 2, 32, 13, torch.float16, 3, 1, 1, id="joint-U3-M1-H2-d32-fp16"),
]
BLOCK_PARAMS = ("batch", "seq", "heads", "dim", "n_rows", "dtype", "n_units", "members", "blocks")


def _block_setup(batch, seq, heads, dim, n_rows, dtype, n_units, members, blocks, seed):
    """Units of `members` layers whose (members, H, d) vectors are coded as `blocks` blocks; the last of several
    units codes only half its components, so the tables are padded, and the first decodes its values around another
    mean, as a pair's coders do."""
    generator = torch.Generator().manual_seed(seed)
    width = members * heads * dim // blocks
    coders = []
    for unit in range(n_units):
        comps = width // 2 if n_units > 1 and unit == n_units - 1 else width
        pair = tuple(random_coder(blocks, width, generator, False, comps, DEVICE) for _ in range(2))
        if unit == 0:  # a pair's decoder predicts the consumer's vectors, around the consumer's mean
            pair[1].out_mean = pair[1].mean + torch.randn(blocks, width, generator=generator).to(DEVICE)
        coders.append(pair)
    layers = n_units * members

    def cache():
        return [random_cache(batch, heads, seq, dim, dtype, generator, DEVICE) for _ in range(layers)]

    keys, values = cache(), cache()
    cos, sin = random_rope(batch, seq, dim, generator, DEVICE)
    rows = torch.randperm(batch * seq, generator=generator)[:n_rows].to(DEVICE)
    group = [slice(u * members, (u + 1) * members) for u in range(n_units)]
    return [keys[g] for g in group], [values[g] for g in group], cos, sin, rows, coders


@pytest.mark.parametrize(BLOCK_PARAMS, BLOCK_CASES)
def test_block_encode_matches_reference(batch, seq, heads, dim, n_rows, dtype, n_units, members, blocks):
    from hf_scd import kernels

    keys, values, cos, sin, rows, coders = _block_setup(
        batch, seq, heads, dim, n_rows, dtype, n_units, members, blocks, seed=dim + members
    )
    assert kernels.covers(keys, coders) and not kernels._fused(keys, coders)
    got = kernels.encode_rows(keys, values, cos, sin, rows, coders)
    ref = codec.encode_rows(keys, values, cos, sin, rows, coders)
    assert len(got) == n_units
    for got_unit, ref_unit, coder in zip(got, ref, coders, strict=True):
        _check_unit_codes(got_unit, ref_unit, coder)


@pytest.mark.parametrize(BLOCK_PARAMS, BLOCK_CASES)
def test_block_decode_matches_reference_and_writes_only_rows(
    batch, seq, heads, dim, n_rows, dtype, n_units, members, blocks
):
    from hf_scd import kernels

    keys, values, cos, sin, rows, coders = _block_setup(
        batch, seq, heads, dim, n_rows, dtype, n_units, members, blocks, seed=dim + members + 1
    )
    codes = _layer_codes(codec.encode_rows(keys, values, cos, sin, rows, coders))
    layers = n_units * members
    poison = torch.full((2, 2, layers, batch, heads, seq, dim), float("nan"), dtype=dtype, device=DEVICE)
    outputs = []
    for impl, (out_keys, out_values) in zip((kernels, codec), poison.unbind(0), strict=True):
        grouped = [
            [list(part.unbind(0)[u * members : (u + 1) * members]) for u in range(n_units)]
            for part in (out_keys, out_values)
        ]
        impl.decode_rows(codes, cos, sin, rows, coders, *grouped)
        outputs.append((out_keys, out_values))
    written = torch.zeros(batch * seq, dtype=torch.bool, device=DEVICE)
    written[rows] = True
    written = written.view(1, batch, 1, seq, 1).expand_as(poison[0, 0])
    for got, ref in zip(*outputs, strict=True):
        assert got[written].isfinite().all() and got[~written].isnan().all()
        got, ref = got[written].float(), ref[written].float()
        err = (got - ref).abs()
        assert (err <= ref.abs() * torch.finfo(dtype).eps + PIECE_ATOL[torch.float32] * ref.abs().max()).all()


def test_block_path_empty_rows_and_what_it_covers():
    from hf_scd import kernels

    keys, values, cos, sin, _, coders = _block_setup(1, 5, 2, 32, 0, torch.bfloat16, 2, 2, 1, seed=4)
    rows = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    encoded = kernels.encode_rows(keys, values, cos, sin, rows, coders)
    assert [tuple(unit[0].shape) for unit in encoded] == [(0, code.layout.bytes_per_token) for code, _ in coders]
    assert all(tuple(unit[1].shape) == (0, 1) for unit in encoded)
    # Units of different member counts, or a head_dim the kernels do not take, are left to the reference.
    assert not kernels.covers([keys[0], keys[1][:1]], coders)
    odd = [[torch.zeros(1, 2, 5, 48, device=DEVICE)]]
    odd_coder = random_coder(2, 48, torch.Generator().manual_seed(0), False, 48, DEVICE)
    assert not kernels.covers(odd, [(odd_coder, odd_coder)])


def test_block_path_on_the_shipped_joint_units_and_real_keys(smollm2, artifacts, chat_ids):
    """SmolLM2's shipped 8x plan (six 5-layer joint units, 960 components each) on the model's own K/V of a chat
    prompt: the block path's codes and reconstruction are the reference's."""
    from transformers import DynamicCache

    from hf_scd import kernels
    from hf_scd.compat import with_cache

    model, _ = smollm2
    cache = DynamicCache()
    with torch.no_grad():
        model(chat_ids, **with_cache(model, cache))
    kv = [(layer.keys.to(DEVICE), layer.values.to(DEVICE)) for layer in cache.layers]
    seq, dim = chat_ids.shape[1], kv[0][0].shape[-1]
    cos, sin = (t.reshape(seq, dim).to(DEVICE) for t in model.model.rotary_emb(kv[0][0], torch.arange(seq)[None]))
    plan = artifacts.plan("8x", DEVICE)
    keys, values = plan._unit_inputs(plan.units, kv)
    coders = [(unit.key, unit.value) for unit in plan.units]
    rows = torch.arange(4, seq, device=DEVICE)
    assert kernels.covers(keys, coders) and not kernels._fused(keys, coders)
    got = kernels.encode_rows(keys, values, cos, sin, rows, coders)
    ref = codec.encode_rows(keys, values, cos, sin, rows, coders)
    for got_unit, ref_unit, coder in zip(got, ref, coders, strict=True):
        _check_unit_codes(got_unit, ref_unit, coder)
    codes = _layer_codes(ref)
    outputs = torch.zeros(2, 2, len(kv), *kv[0][0].shape, dtype=kv[0][0].dtype, device=DEVICE)
    for impl, out_kv in zip((kernels, codec), outputs, strict=True):
        impl.decode_rows(codes, cos, sin, rows, coders, *plan._unit_inputs(plan.units, list(zip(*out_kv, strict=True))))
    (got_keys, got_values), (ref_keys, ref_values) = outputs
    for got, ref in ((got_keys, ref_keys), (got_values, ref_values)):
        assert ref.abs().amax() > 0 and (got - ref).abs().amax() <= 1e-5 * ref.abs().amax()


def test_block_path_with_layers_of_other_strides_launches_a_layer_at_a_time():
    """Member layers whose tensors differ in strides (a gather or scatter launch each) code and decode as the
    reference does."""
    from hf_scd import kernels

    keys, values, cos, sin, rows, coders = _block_setup(1, 7, 2, 32, 6, torch.float32, 2, 2, 1, seed=11)
    keys[0][1] = keys[0][1].contiguous()  # strides now differ from the other layers'
    got = kernels.encode_rows(keys, values, cos, sin, rows, coders)
    ref = codec.encode_rows(keys, values, cos, sin, rows, coders)
    for got_unit, ref_unit in zip(got, ref, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got_unit, ref_unit, strict=True))
    codes = _layer_codes(ref)
    outputs = [[[torch.zeros_like(layer) for layer in unit] for unit in keys + values] for _ in range(2)]
    outputs[0][0][0] = torch.zeros(1, 7, 2, 32, device=DEVICE).transpose(1, 2)  # an output of other strides too
    for impl, out in zip((kernels, codec), outputs, strict=True):
        impl.decode_rows(codes, cos, sin, rows, coders, out[:2], out[2:])
    for got_unit, ref_unit in zip(*outputs, strict=True):
        for a, b in zip(got_unit, ref_unit, strict=True):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_block_path_in_chunks_of_tokens_matches_one_chunk(monkeypatch):
    """Long contexts are coded CHUNK_TOKENS rows at a time (bounded intermediates): the same codes and outputs."""
    from hf_scd import kernels
    from hf_scd.kernels import blocks

    keys, values, cos, sin, rows, coders = _block_setup(2, 11, 2, 32, 19, torch.bfloat16, 2, 2, 1, seed=12)
    whole = kernels.encode_rows(keys, values, cos, sin, rows, coders)
    monkeypatch.setattr(blocks, "CHUNK_TOKENS", 5)
    chunked = kernels.encode_rows(keys, values, cos, sin, rows, coders)
    for a, b in zip(whole, chunked, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    codes = _layer_codes(whole)
    outputs = []
    for chunk in (5, 10**6):
        monkeypatch.setattr(blocks, "CHUNK_TOKENS", chunk)
        out = [[torch.full_like(layer, float("nan")) for layer in unit] for unit in keys + values]
        kernels.decode_rows(codes, cos, sin, rows, coders, out[:2], out[2:])
        outputs.append(out)
    for got_unit, ref_unit in zip(*outputs, strict=True):
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(got_unit, ref_unit, strict=True))
