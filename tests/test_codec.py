"""The codec's math on its own: rotary inversion, bit packing, transform coding."""

import pytest
import torch

from hf_scd.codec import BitLayout, TransformCode, apply_rotary, pack_codes, remove_rotary, unpack_codes


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
    layout = BitLayout(bits)
    codes = (torch.rand(11, 3, 64, generator=generator) * torch.exp2(bits.float())).floor().to(torch.int32)
    packed = pack_codes(codes, layout)
    assert packed.shape == (11, (int(bits.sum()) + 7) // 8)
    assert torch.equal(unpack_codes(packed, layout), codes * (bits > 0))


def _coder(bits_per_component: int, dim: int = 16) -> TransformCode:
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(2, dim, dim))[0]
    scale = torch.linspace(3, 0.1, dim).expand(2, dim).clone()
    steps = torch.tensor([0.0] + [8.0 / 2**b for b in range(1, 9)])  # covers +-4 token RMS
    bits = torch.full((2, dim), bits_per_component, dtype=torch.uint8)
    return TransformCode(torch.zeros(2, dim), basis, scale, steps, bits)


def test_transform_code_error_falls_with_bits():
    torch.manual_seed(1)
    coder8 = _coder(8)
    x = torch.einsum("nhc,hdc->nhd", torch.randn(256, 2, 16) * coder8.scale, coder8.basis)
    errors = []
    for bits in (2, 4, 8):
        coder = _coder(bits)
        packed, scales = coder.encode(x)
        assert packed.shape == (256, 2 * 16 * bits // 8) and scales.dtype == torch.float16
        errors.append(float((coder.decode(packed, scales) - x).pow(2).mean() / x.pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3
