"""The Triton kernels against the torch reference in hf_scd.codec, on random coders and caches of odd sizes.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py before
anything imports triton); on a CUDA machine the same tests run the compiled kernels on the GPU.

Tolerances, and why: the kernels' dot products sum in another order than torch's einsum, so a token-head's RMS can
land on the other side of a scale-code boundary (scale code off by 1), and a coefficient exactly at a quantizer
boundary can round the other way (code off by 1). Both are measured and bounded (`MAX_SCALE_MISMATCH`,
`MAX_CODE_MISMATCH`); everything else is bit-exact. Decoding is compared in float32 up to `DECODE_ATOL` relative to
the data's magnitude, and in bf16/fp16 up to one rounding step of the output dtype.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 (conftest.py sets it)", allow_module_level=True)
pytest.importorskip("triton")

from hf_scd import codec  # noqa: E402
from kernels import available  # noqa: E402
from kernels.decode import decode_rows  # noqa: E402
from kernels.encode import encode_rows  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
MAX_SCALE_MISMATCH = 0.02  # fraction of token-heads whose scale code is off by 1 (never more than 1)
MAX_CODE_MISMATCH = 2e-3  # fraction of codes (in token-heads with equal scale codes) off by 1 (never more than 1)
DECODE_ATOL = 1e-5  # float32 outputs: max |kernel - reference| / max |reference|
STEPS = torch.tensor([0.0] + [6.0 / 2**b for b in range(1, 9)])  # covers +-3 token RMS

CASES = [
    # batch, seq, heads, dim, coded rows, cache dtype
    pytest.param(2, 23, 3, 64, 37, torch.bfloat16, id="N37-H3-d64-bf16"),
    pytest.param(1, 9, 2, 128, 5, torch.float32, id="N5-H2-d128-fp32"),
    pytest.param(3, 7, 1, 256, 17, torch.float16, id="N17-H1-d256-fp16"),
]


def _coder(heads: int, dim: int, generator: torch.Generator, zero_head: bool) -> codec.TransformCode:
    """Random well-conditioned encoder, decoder its inverse, random 0..8-bit allocation, nonzero mean."""
    q = torch.linalg.qr(torch.randn(heads, dim, dim, generator=generator, dtype=torch.float64))[0]
    encoder = q * torch.linspace(3.0, 0.5, dim, dtype=torch.float64)  # column c scaled: unit-ish coefficients
    decoder = torch.linalg.inv(encoder)
    bits = torch.randint(0, 9, (heads, dim), generator=generator).to(torch.uint8)
    if zero_head:
        bits[-1] = 0  # the last head keeps nothing: its dropped components point one byte past the end
    mean = torch.randn(heads, dim, generator=generator) * 0.3
    return codec.TransformCode(mean, encoder.float(), decoder.float(), STEPS.clone(), bits).to(DEVICE)


def _rope(batch: int, seq: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (batch*seq, dim) of real RoPE angles at random positions, with a YaRN-like attention scaling."""
    positions = torch.randint(0, 32768, (batch * seq,), generator=generator).double()
    inv_freq = 500000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions[:, None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    return (angles.cos() * 1.1).float().to(DEVICE), (angles.sin() * 1.1).float().to(DEVICE)


def _cache(batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A non-contiguous (batch, heads, seq, dim) cache tensor, like a transposed projection output."""
    x = torch.randn(batch, seq, heads, dim, generator=generator) * torch.linspace(2.0, 0.2, dim) + 0.5
    return x.to(dtype).to(DEVICE).transpose(1, 2)


def _setup(batch, seq, heads, dim, n_rows, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    key_code = _coder(heads, dim, generator, zero_head=heads > 1)
    value_code = _coder(heads, dim, generator, zero_head=False)
    keys = _cache(batch, heads, seq, dim, dtype, generator)
    values = _cache(batch, heads, seq, dim, dtype, generator)
    cos, sin = _rope(batch, seq, dim, generator)
    rows = torch.randperm(batch * seq, generator=generator)[:n_rows].to(DEVICE)
    return keys, values, cos, sin, rows, key_code, value_code


def _check_codes(got_codes, got_scales, ref_codes, ref_scales, code: codec.TransformCode) -> float:
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


@pytest.mark.parametrize(("batch", "seq", "heads", "dim", "n_rows", "dtype"), CASES)
def test_encode_matches_reference(batch, seq, heads, dim, n_rows, dtype):
    keys, values, cos, sin, rows, key_code, value_code = _setup(batch, seq, heads, dim, n_rows, dtype, seed=dim)
    got = encode_rows(keys, values, cos, sin, rows, key_code, value_code)
    ref = codec.encode_rows(keys, values, cos, sin, rows, key_code, value_code)
    key_mismatch = _check_codes(got[0], got[1], ref[0], ref[1], key_code)
    value_mismatch = _check_codes(got[2], got[3], ref[2], ref[3], value_code)
    print(f"code mismatch fraction: keys {key_mismatch:.2e}, values {value_mismatch:.2e}")
    if heads > 1:  # heads with no bits get scale code 0 (RMS 0, clamped to 2^-8) in both
        assert (got[1][:, -1] == 0).all() and (ref[1][:, -1] == 0).all()


@pytest.mark.parametrize(("batch", "seq", "heads", "dim", "n_rows", "dtype"), CASES)
def test_decode_matches_reference_and_writes_only_rows(batch, seq, heads, dim, n_rows, dtype):
    keys, values, cos, sin, rows, key_code, value_code = _setup(batch, seq, heads, dim, n_rows, dtype, seed=dim + 1)
    codes = codec.LayerCodes(
        *codec.encode_rows(keys, values, cos, sin, rows, key_code, value_code), None, None, None, None
    )
    poison = torch.full((batch, heads, seq, dim), float("nan"), dtype=dtype, device=DEVICE)
    got_keys, got_values, ref_keys, ref_values = (poison.clone() for _ in range(4))
    decode_rows(codes, cos, sin, rows, key_code, value_code, got_keys, got_values)
    codec.decode_rows(codes, cos, sin, rows, key_code, value_code, ref_keys, ref_values)
    written = torch.zeros(batch * seq, dtype=torch.bool, device=DEVICE)
    written[rows] = True
    written = written.view(batch, 1, seq, 1).expand_as(poison)
    for got, ref in ((got_keys, ref_keys), (got_values, ref_values)):
        assert got[written].isfinite().all() and got[~written].isnan().all()
        got, ref = got[written].float(), ref[written].float()
        err = (got - ref).abs()
        if dtype == torch.float32:
            assert err.max() <= DECODE_ATOL * ref.abs().max()
        else:  # one rounding step of the output dtype
            assert (err <= ref.abs() * torch.finfo(dtype).eps + 1e-6).all()


def test_empty_rows_and_available():
    keys, values, cos, sin, _, key_code, value_code = _setup(1, 5, 2, 64, 0, torch.bfloat16, seed=3)
    rows = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    key_codes, key_scales, value_codes, value_scales = encode_rows(keys, values, cos, sin, rows, key_code, value_code)
    assert key_codes.shape == (0, key_code.layout.bytes_per_token) and value_scales.shape == (0, 2)
    out = torch.zeros_like(keys)
    codes = codec.LayerCodes(key_codes, key_scales, value_codes, value_scales, None, None, None, None)
    decode_rows(codes, cos, sin, rows, key_code, value_code, out, out.clone())
    assert (out == 0).all()
    assert available() == ON_GPU


def test_round_trip_through_kernels_alone_matches_reference_round_trip():
    """Encode then decode with the kernels only (all rows, 8 bits): the reconstruction error is the reference's."""
    keys, values, cos, sin, rows, key_code, value_code = _setup(1, 19, 2, 64, 19, torch.float32, seed=5)
    for code in (key_code, value_code):
        code.bits = torch.full_like(code.bits, 8)
    outputs = []
    for encode, decode in ((encode_rows, decode_rows), (codec.encode_rows, codec.decode_rows)):
        codes = codec.LayerCodes(*encode(keys, values, cos, sin, rows, key_code, value_code), None, None, None, None)
        out_keys, out_values = torch.empty_like(keys), torch.empty_like(values)
        decode(codes, cos, sin, rows, key_code, value_code, out_keys, out_values)
        outputs.append(
            [
                float((got - ref).pow(2).mean() / ref.pow(2).mean())
                for got, ref in ((out_keys, keys), (out_values, values))
            ]
        )
    (kernel_key, kernel_value), (ref_key, ref_value) = outputs
    assert kernel_key == pytest.approx(ref_key, rel=0.02) and kernel_value == pytest.approx(ref_value, rel=0.02)
    assert max(kernel_key, kernel_value) < 1e-2
