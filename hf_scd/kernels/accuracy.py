"""How far the kernels' results are from the torch reference's: `python -m hf_scd.kernels.accuracy [--rows N]`.

On random well-conditioned coders with a 0..8-bit allocation and real RoPE angles, for bf16, fp16 and fp32 caches,
it prints the fraction of scale codes and codes one step off the reference's (quantizer boundaries: the bf16
pieces carry 16 bits of the encoder), and for decoding into each dtype the largest error against the fp32
reference, beside the error of rounding that reference to the dtype. Runs on a GPU, or on CPU under
TRITON_INTERPRET=1, which computes the same products. The random parts are shared with tests/test_kernels.py.
"""

from __future__ import annotations

import argparse
import sys

import torch

from hf_scd import codec, codes

from ._tables import INTERPRET

STEPS = torch.tensor([0.0] + [6.0 / 2**b for b in range(1, 9)])  # covers +-3 token RMS
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def random_coder(
    heads: int, dim: int, generator: torch.Generator, zero_head: bool, comps: int, device: torch.device
) -> codes.TransformCode:
    """Random well-conditioned encoder to `comps` coefficients, decoder its (pseudo-)inverse, random 0..8-bit
    allocation, nonzero mean; with `zero_head`, the last head keeps nothing."""
    q = torch.linalg.qr(torch.randn(heads, dim, dim, generator=generator, dtype=torch.float64))[0][..., :comps]
    encoder = q * torch.linspace(3.0, 0.5, comps, dtype=torch.float64)  # column c scaled: unit-ish coefficients
    decoder = torch.linalg.pinv(encoder)
    bits = torch.randint(0, 9, (heads, comps), generator=generator).to(torch.uint8)
    if zero_head:
        bits[-1] = 0  # its dropped components point one byte past the end
    mean = torch.randn(heads, dim, generator=generator) * 0.3
    return codes.TransformCode(mean, encoder.float(), decoder.float(), STEPS.clone(), bits).to(device)


def random_rope(
    batch: int, seq: int, dim: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (batch*seq, dim) of real RoPE angles at random positions, with a YaRN-like attention scaling."""
    positions = torch.randint(0, 32768, (batch * seq,), generator=generator).double()
    inv_freq = 500000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions[:, None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    return (angles.cos() * 1.1).float().to(device), (angles.sin() * 1.1).float().to(device)


def random_cache(
    batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """A non-contiguous (batch, heads, seq, dim) cache tensor, like a transposed projection output."""
    x = torch.randn(batch, seq, heads, dim, generator=generator) * torch.linspace(2.0, 0.2, dim) + 0.5
    return x.to(dtype).to(device).transpose(1, 2)


def code_mismatch(got: codes.RowCodes, ref: codes.RowCodes, pair: codes.CoderPair) -> list[tuple[float, float]]:
    """(scale codes off, codes off in token-heads of equal scale code) for keys and values, as fractions."""
    out = []
    for part, code in ((0, pair[0]), (2, pair[1])):
        scale_off = got[part + 1].int() != ref[part + 1].int()
        same_scale = (~scale_off).unsqueeze(-1)
        kept = code.bits.to(same_scale.device) > 0
        diff = codec.unpack_codes(got[part], code.layout) != codec.unpack_codes(ref[part], code.layout)
        out.append((float(scale_off.float().mean()), float(diff[same_scale & kept].float().mean())))
    return out


def main(argv: list[str] | None = None) -> int:
    from .decode import decode_rows
    from .encode import encode_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="tokens coded, of 2 heads of 128 dims")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not INTERPRET:
        parser.error("no GPU here: run it under TRITON_INTERPRET=1")
    batch, heads, dim = 4, 2, 128
    seq = -(-args.rows // batch)
    note = ", interpreted: its bf16/fp16 conversion truncates, up to one rounding step more" if INTERPRET else ""
    print(f"{args.rows} tokens x {heads} heads x {dim} dims, one layer, on {device}{note}")
    print("| cache | scale codes off (K / V) | codes off (K / V) | decode: max error / max value | its rounding |")
    print("|---|---|---|---|---|")
    for dtype in DTYPES:
        generator = torch.Generator().manual_seed(0)
        pair = tuple(random_coder(heads, dim, generator, False, dim, device) for _ in range(2))
        keys, values = (random_cache(batch, heads, seq, dim, dtype, generator, device) for _ in range(2))
        cos, sin = random_rope(batch, seq, dim, generator, device)
        rows = torch.randperm(batch * seq, generator=generator)[: args.rows].to(device)
        got = encode_rows([[keys]], [[values]], cos, sin, rows, [pair])[0]
        ref = codec.encode_rows([[keys]], [[values]], cos, sin, rows, [pair])[0]
        (key_scale, key_codes), (value_scale, value_codes) = code_mismatch(got, ref, pair)
        layer = [codes.LayerCodes(*ref, None, None, None, None)]
        exact = [torch.zeros(keys.shape, dtype=torch.float32, device=device) for _ in range(2)]
        codec.decode_rows(layer, cos, sin, rows, [pair], [exact[:1]], [exact[1:]])
        out = [torch.zeros(keys.shape, dtype=dtype, device=device) for _ in range(2)]
        decode_rows(layer, cos, sin, rows, [pair], [out[:1]], [out[1:]])
        error = max(float((o.float() - e).abs().max() / e.abs().max()) for o, e in zip(out, exact, strict=True))
        rounding = max(float((e.to(dtype).float() - e).abs().max() / e.abs().max()) for e in exact)
        print(
            f"| {str(dtype).removeprefix('torch.')} | {key_scale:.1e} / {value_scale:.1e} | "
            f"{key_codes:.1e} / {value_codes:.1e} | {error:.1e} | {rounding:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
