"""The codec's math on its own: rotary inversion, bit packing, transform coding."""

import pytest
import torch

from hf_scd.codec import (
    apply_rotary,
    content_keys,
    decode_rows,
    decode_vectors,
    encode_rows,
    encode_vectors,
    flat_rows,
    pack_codes,
    remove_rotary,
    rotated_keys,
    scatter_rows,
    token_runs,
    unpack_codes,
)
from hf_scd.codes import BitLayout, LayerCodes, TransformCode, code_to_scale, scale_to_code


def test_remove_rotary_inverts_apply_rotary_with_attention_scaling():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 64, dtype=torch.float64)
    angles = torch.rand(2, 17, 32, dtype=torch.float64) * 100
    scaling = 1.3  # YaRN-style attention scaling folded into cos/sin
    cos = (torch.cat([angles.cos(), angles.cos()], -1) * scaling).unsqueeze(1)
    sin = (torch.cat([angles.sin(), angles.sin()], -1) * scaling).unsqueeze(1)
    assert torch.allclose(remove_rotary(apply_rotary(x, cos, sin), cos, sin), x, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_unpack_round_trip_on_random_allocations(seed):
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 9, (3, 64), generator=generator).to(torch.uint8)
    bits[1] = 0  # a head with nothing kept
    bits[2, -5:] = 0  # trailing dropped components
    layout = BitLayout(bits)
    codes = (torch.rand(11, 3, 64, generator=generator) * torch.exp2(bits.float())).floor().to(torch.int32)
    packed = pack_codes(codes, layout)
    per_head_bytes = (bits.long().sum(-1) + 7) // 8
    assert packed.shape == (11, int(per_head_bytes.sum()))
    assert torch.equal(unpack_codes(packed, layout), codes * (bits > 0))
    # Heads never share a byte: changing head 2's codes leaves head 0's bytes alone.
    other = codes.clone()
    other[:, 2] = 0
    assert torch.equal(pack_codes(other, layout)[:, : per_head_bytes[0]], packed[:, : per_head_bytes[0]])


def test_pack_is_exact_when_float32_products_run_in_bf16():
    """Packing's float32 products stay exact when a user lets torch run them in bf16 or TF32: every term is a code
    (8 significant bits at most) times a power of two, summed in float32."""
    generator = torch.Generator().manual_seed(5)
    bits = torch.sort(torch.randint(1, 9, (1, 128), generator=generator), descending=True).values.to(torch.uint8)
    codes = (torch.rand(33, 1, 128, generator=generator) * torch.exp2(bits.float())).floor().to(torch.int32)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        packed = pack_codes(codes, BitLayout(bits))
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(packed, _bit_by_bit(codes, bits))


def test_scale_codes_round_trip_within_half_a_step():
    rms = torch.exp2(torch.linspace(-7.9, 7.9, 1000))
    ratio = code_to_scale(scale_to_code(rms)) / rms
    assert float((ratio.log2().abs() * 16).max()) <= 0.5 + 1e-4


def _coder(bits_per_component: int, dim: int = 16) -> TransformCode:
    """A coder for vectors whose principal axes are a random rotation with spreads 3 .. 0.1."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(2, dim, dim))[0]
    spread = torch.linspace(3, 0.1, dim)
    steps = torch.tensor([0.0] + [8.0 / 2**b for b in range(1, 9)])  # covers +-4 token RMS
    bits = torch.full((2, dim), bits_per_component, dtype=torch.uint8)
    encoder = basis / spread
    decoder = spread[:, None] * basis.transpose(-1, -2)
    return TransformCode(torch.full((2, dim), 0.5), encoder, decoder, steps, bits)


def test_transform_code_error_falls_with_bits():
    torch.manual_seed(1)
    coder8 = _coder(8)
    x = torch.einsum("nhc,hcd->nhd", torch.randn(256, 2, 16), coder8.decoder) + coder8.mean
    errors = []
    for bits in (2, 4, 8):
        coder = _coder(bits)
        packed, scales = encode_vectors(coder, x)
        assert packed.shape == (256, 2 * 16 * bits // 8) and scales.dtype == torch.uint8
        errors.append(float((decode_vectors(coder, packed, scales) - x).pow(2).mean() / x.pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


def test_a_coder_with_no_bits_emits_no_code_bytes():
    layout = BitLayout(torch.tensor([[3, 0], [0, 0]], dtype=torch.uint8))  # the last head keeps nothing
    codes = torch.tensor([[[5, 0], [0, 0]]], dtype=torch.int32)
    assert torch.equal(unpack_codes(pack_codes(codes, layout), layout), codes)
    empty = BitLayout(torch.zeros(2, 4, dtype=torch.uint8))
    packed = pack_codes(torch.zeros(3, 2, 4, dtype=torch.int32), empty)
    assert packed.shape == (3, 0) and not unpack_codes(packed, empty).any()


def _bit_by_bit(codes: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`BitLayout`'s definition, one bit at a time: each head's codes in order, least significant bit first, each
    head's run padded to a whole byte."""
    rows = []
    for token in codes:
        out = []
        for head_codes, head_bits in zip(token.tolist(), bits.tolist(), strict=True):
            stream = [
                (code >> bit) & 1 for code, width in zip(head_codes, head_bits, strict=True) for bit in range(width)
            ]
            stream += [0] * (-len(stream) % 8)
            out += [sum(b << i for i, b in enumerate(stream[start : start + 8])) for start in range(0, len(stream), 8)]
        rows.append(out)
    return torch.tensor(rows, dtype=torch.uint8).reshape(codes.shape[0], -1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("heads, dim", [(4, 24), (4, 64), (1, 160)], ids=["one-chunk", "2-chunks", "joint-5-chunks"])
def test_pack_matches_the_bit_by_bit_definition(seed, heads, dim):
    """Heads narrower than `PACK_CHUNK`'s multiples take one product; wider ones (a joint unit's single block) are
    packed chunk by chunk, whose windows overlap where a code spills into the next chunk's first byte."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 9, (heads, dim), generator=generator).to(torch.uint8)
    bits[seed % heads] = 0  # an empty head, first, inside or last (the only head when there is one)
    if heads == 1:  # and a joint unit's shape: widths falling with importance, the last components dropped
        bits = torch.sort(torch.randint(0, 9, (1, dim), generator=generator), descending=True).values.to(torch.uint8)
    layout = BitLayout(bits)
    codes = (torch.rand(7, heads, dim, generator=generator) * torch.exp2(bits.float())).floor().to(torch.int32)
    packed = pack_codes(codes, layout)
    assert torch.equal(packed, _bit_by_bit(codes, bits))
    assert torch.equal(unpack_codes(packed, layout), codes)


def test_rows_in_several_runs_code_as_token_by_token():
    """Rows split across batch rows and around a hole in the mask code as gathering them one by one would."""
    torch.manual_seed(3)
    batch, heads, seq, dim = 3, 2, 12, 16
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, 5:8] = False  # a hole
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    assert len(token_runs(rows, seq)) == 4
    angles = torch.rand(batch * seq, dim // 2) * 20
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keys, values = torch.randn(batch, heads, seq, dim), torch.randn(batch, heads, seq, dim)
    key_code, value_code = _coder(4), _coder(3)
    (got,) = encode_rows([[keys]], [[values]], cos, sin, rows, [(key_code, value_code)])
    want = (
        *encode_vectors(key_code, content_keys(flat_rows(keys, rows), cos, sin, rows)),
        *encode_vectors(value_code, flat_rows(values, rows)),
    )
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    out = torch.full((2, batch, heads, seq, dim), float("nan"))
    empty = torch.empty(0)
    decode_rows(
        [LayerCodes(*got, empty, empty, empty, empty)], cos, sin, rows, [(key_code, value_code)], [[out[0]]], [[out[1]]]
    )
    expected = torch.full_like(out, float("nan"))
    scatter_rows(expected[0], rows, rotated_keys(decode_vectors(key_code, *got[:2]), cos, sin, rows))
    scatter_rows(expected[1], rows, decode_vectors(value_code, *got[2:]))
    assert torch.allclose(out, expected, atol=1e-5, equal_nan=True)


def _joint_coder(bits_per_component: int, width: int, seed: int) -> TransformCode:
    """One block over a whole unit (a joint basis), principal axes a random rotation with spreads 3 .. 0.1."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(1, width, width, generator=generator))[0]
    spread = torch.linspace(3, 0.1, width)
    steps = torch.tensor([0.0] + [8.0 / 2**b for b in range(1, 9)])
    bits = torch.full((1, width), bits_per_component, dtype=torch.uint8)
    mean = torch.randn(1, width, generator=generator) * 0.2
    return TransformCode(mean, basis / spread, spread[:, None] * basis.transpose(-1, -2), steps, bits)


def _two_layer_unit(batch: int, heads: int, seq: int, dim: int, max_angle: float):
    """Random rotary (cos, sin) (batch*seq, dim) and two layers' keys and values (batch, heads, seq, dim), drawn from
    torch's global generator in that order."""
    angles = torch.rand(batch * seq, dim // 2) * max_angle
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keys = [torch.randn(batch, heads, seq, dim) for _ in range(2)]
    values = [torch.randn(batch, heads, seq, dim) for _ in range(2)]
    return cos, sin, keys, values


def test_a_joint_unit_codes_its_layers_heads_side_by_side():
    """A unit of two layers with one basis: its codes are the codes of each token's (layers, heads, dim) vector, and
    decoding writes each member layer back, keys re-rotated."""
    torch.manual_seed(4)
    batch, heads, seq, dim = 2, 2, 9, 16
    rows = torch.arange(batch * seq)[3:]
    cos, sin, keys, values = _two_layer_unit(batch, heads, seq, dim, max_angle=20)
    key_code, value_code = _joint_coder(6, 2 * heads * dim, 0), _joint_coder(5, 2 * heads * dim, 1)
    (got,) = encode_rows([keys], [values], cos, sin, rows, [(key_code, value_code)])
    joint_keys = torch.stack([content_keys(flat_rows(k, rows), cos, sin, rows) for k in keys], 1)
    joint_values = torch.stack([flat_rows(v, rows) for v in values], 1)
    want = (
        *encode_vectors(key_code, joint_keys.reshape(rows.numel(), 1, -1)),
        *encode_vectors(value_code, joint_values.reshape(rows.numel(), 1, -1)),
    )
    assert got[1].shape == (rows.numel(), 1)  # one scale code per token for the whole unit
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    out = torch.zeros(2, 2, batch, heads, seq, dim)
    empty = torch.empty(0)
    codes = [LayerCodes(*got, empty, empty, empty, empty)]
    decode_rows(codes, cos, sin, rows, [(key_code, value_code)], [list(out[0])], [list(out[1])])
    decoded_keys = decode_vectors(key_code, *got[:2]).reshape(rows.numel(), 2, heads, dim)
    decoded_values = decode_vectors(value_code, *got[2:]).reshape(rows.numel(), 2, heads, dim)
    for member in range(2):
        expected_keys, expected_values = torch.zeros_like(out[0, 0]), torch.zeros_like(out[1, 0])
        scatter_rows(expected_keys, rows, rotated_keys(decoded_keys[:, member], cos, sin, rows))
        scatter_rows(expected_values, rows, decoded_values[:, member])
        assert torch.allclose(out[0, member], expected_keys, atol=1e-5)
        assert torch.allclose(out[1, member], expected_values, atol=1e-5)


def test_a_token_with_a_massive_coefficient_is_not_clipped():
    """The scale is raised above the RMS where the RMS would clip a component of PEAK_BITS or more: one huge
    coefficient among small ones (a massive activation) survives, and the other tokens are coded as before."""
    coder = _coder(6)
    torch.manual_seed(5)
    unit = torch.randn(64, 2, 16) * 0.5
    unit[7, 0, 3] = 60.0  # 20 times what its bits reach at the token's RMS
    x = torch.einsum("nhc,hcd->nhd", unit, coder.decoder) + coder.mean
    decoded = decode_vectors(coder, *encode_vectors(coder, x))
    error = (decoded - x).norm(dim=-1) / (x - coder.mean).norm(dim=-1)
    assert error[7, 0] < 0.1  # clipped at the RMS's reach it would keep about 1/20 of the coefficient
    assert error.max() < 0.1
    assert coder.peak_limits().shape == (2, 16) and bool((coder.peak_limits() > 0).all())
    assert not bool((_coder(3).peak_limits() > 0).any())  # below PEAK_BITS: the RMS alone, as in codec v2


@pytest.mark.parametrize("bits", [5, 8])
def test_bf16_products_add_little_error_to_the_quantization(bits):
    """The CPU path's bf16 products (`backend.products`) on a joint unit of two layers: the round trip's error is
    within 3% of the float32 products' (and, at 8 bits, where bf16's 2^-9 rounding is nearest a step, the scale
    codes still agree for most tokens); decoding the bf16 path's codes with float32 products gives the same K/V up
    to bf16 rounding."""
    torch.manual_seed(7)
    batch, heads, seq, dim = 1, 2, 300, 32
    rows = torch.arange(batch * seq)[4:]
    cos, sin, keys, values = _two_layer_unit(batch, heads, seq, dim, max_angle=50)
    coders = [(_joint_coder(bits, 2 * heads * dim, 0), _joint_coder(bits, 2 * heads * dim, 1))]
    errors = {}
    for products in (torch.float32, torch.bfloat16):
        (codes,) = encode_rows([keys], [values], cos, sin, rows, coders, products)
        out = torch.zeros(2, 2, batch, heads, seq, dim)
        empty = torch.empty(0)
        layer = [LayerCodes(*codes, empty, empty, empty, empty)]
        decode_rows(layer, cos, sin, rows, coders, [list(out[0])], [list(out[1])], products)
        exact = torch.stack([torch.stack(keys), torch.stack(values)])[..., 4:, :]
        errors[products] = ((out[..., 4:, :] - exact).square().sum() / exact.square().sum()).item()
        if products == torch.float32:
            reference_codes = codes
    assert errors[torch.bfloat16] <= errors[torch.float32] * 1.03, errors
    same_scale = (codes[1] == reference_codes[1]).float().mean()
    assert same_scale >= 0.9
    other = torch.zeros_like(out)
    decode_rows(layer, cos, sin, rows, coders, [list(other[0])], [list(other[1])], torch.float32)
    assert torch.allclose(other, out, rtol=2**-7, atol=2**-7 * out.abs().max())
