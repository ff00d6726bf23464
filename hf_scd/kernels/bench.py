"""Benchmark of the codec kernels on model-shaped synthetic caches: `python -m hf_scd.kernels.bench [--out table.md]`.

Per model shape and context length it times encode and decode of all layers (median of triton's do_bench): units of
one layer coded per head on the fused kernels (one launch for all keys, one for all values), and the shipped
artifacts' joint units ("joint" rows) on the block path (kernels around cuBLAS products). It counts the bytes each
must move, and compares the achieved bandwidth with a device-to-device copy measured in the same run and the time
with the plain-torch reference path. `decode_units` is what a consumer runs (the library entry: allocation, the
decode, 4 exact sink tokens). It then puts that
time for an 8K-token Llama-3-8B cache next to 1% of that model's prefill time (random weights; the forward's cost
does not depend on them). Synthetic operating point: ~4 bits/component (a ~4x smaller cache than bf16), random
orthogonal coders.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

SHAPES = {
    # name: (layers, kv heads, head dim, layers a Reuse unit): units of one layer coded per head take the fused
    # kernels; the shipped same-model artifacts' joint units (one block of all their layers' heads) the block path.
    "Llama-3-8B": (32, 8, 128, 1),
    "SmolLM2-135M": (30, 3, 64, 1),
    "SmolLM2-135M joint": (30, 3, 64, 5),
    "Qwen2.5-Coder-0.5B joint": (24, 2, 64, 8),
}
CONTEXTS = (1024, 8192, 32768)
PREFILL_TOKENS = 8192


def _coder(blocks: int, width: int, generator: torch.Generator, device: torch.device):
    """Random orthogonal encoder/decoder per block and a ~4 bits/component allocation falling with the component
    index."""
    from hf_scd.codes import TransformCode

    q = torch.linalg.qr(torch.randn(blocks, width, width, generator=generator))[0]
    profile = 8.0 * (1.0 - torch.arange(width) / width) + torch.rand(blocks, width, generator=generator) * 2 - 1
    bits = profile.round().clamp(0, 8).to(torch.uint8)
    steps = torch.tensor([0.0] + [6.0 / 2**b for b in range(1, 9)])
    mean = torch.randn(blocks, width, generator=generator) * 0.1
    return TransformCode(mean, q, q.transpose(1, 2).contiguous(), steps, bits).to(device)


def _rope(tokens: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 500000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.arange(tokens, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    return angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)  # what HF Llama hands the cache


def _bench(fn, reps_ms: int = 100) -> float:
    """Median milliseconds of fn()."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median"))


def _copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy, counting bytes read + written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def _model_rows(name: str, tokens: int, device: torch.device, copy_gbps: float) -> list[dict]:
    from hf_scd import backend, codec, codes, kernels

    n_layers, heads, dim, members = SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    kv = torch.randn(2, n_layers, 1, heads, tokens, dim, device=device, dtype=torch.bfloat16)
    keys, values = (_units(part, members) for part in kv)
    blocks, width = (heads, dim) if members == 1 else (1, members * heads * dim)
    coders = [
        (_coder(blocks, width, generator, device), _coder(blocks, width, generator, device))
        for _ in range(n_layers // members)
    ]
    cos, sin = _rope(tokens, dim, device)
    rows = torch.arange(tokens, device=device)
    codes = [
        codes.LayerCodes(*e, None, None, None, None) for e in kernels.encode_rows(keys, values, cos, sin, rows, coders)
    ]
    out = torch.empty_like(kv)
    out_keys, out_values = (_units(part, members) for part in out)

    def run_encode(impl):
        return lambda: impl(keys, values, cos, sin, rows, coders)

    def run_decode(impl):
        return lambda: impl(codes, cos, sin, rows, coders, out_keys, out_values)

    mismatch = _agreement(keys, values, cos, sin, rows, coders, codes)
    kv_bytes = kv.numel() * kv.element_size()
    code_bytes = sum(sum(t.numel() for t in (c.key_codes, c.key_scales, c.value_codes, c.value_scales)) for c in codes)
    rope_bytes = 2 * cos.numel() * cos.element_size()
    moved = kv_bytes + code_bytes + rope_bytes  # the same count for encode and decode, in opposite directions
    result = []
    for kind, run in (("encode", run_encode), ("decode", run_decode)):
        kernel_ms = _bench(run(getattr(kernels, f"{kind}_rows")))
        torch_ms = _bench(run(getattr(codec, f"{kind}_rows")), reps_ms=50)
        gbps = moved / (kernel_ms * 1e-3) / 1e9
        result.append(
            dict(model=name, tokens=tokens, kernel=kind, ms=kernel_ms, mb=moved / 1e6, gbps=gbps,
                 copy_frac=gbps / copy_gbps, torch_ms=torch_ms, speedup=torch_ms / kernel_ms, check=mismatch[kind])
        )  # fmt: skip
        print(_table(result[-1:], copy_gbps).splitlines()[-1], file=sys.stderr, flush=True)
    # What a consumer runs: allocation, the decode and the exact (sink) tokens, through the library's entry.
    sink = torch.arange(4, device=device)
    units = backend.encode_units(keys, values, cos, sin, rows[4:], sink, coders)
    library_ms = _bench(
        lambda: backend.decode_units(units, cos, sin, rows[4:], sink, coders, (heads, dim), (1, tokens), torch.bfloat16)
    )
    result.append(dict(result[-1], kernel="decode_units", ms=library_ms, gbps=moved / (library_ms * 1e-3) / 1e9))
    result[-1]["copy_frac"] = result[-1]["gbps"] / copy_gbps
    result[-1].update(torch_ms=float("nan"), speedup=float("nan"), check="library entry: allocation, 4 sink tokens")
    return result


def _units(layers: torch.Tensor, members: int) -> list[list[torch.Tensor]]:
    """(layers, batch, H, seq, d) as Reuse units of `members` consecutive layers."""
    return [list(group.unbind(0)) for group in layers.split(members)]


def _agreement(keys, values, cos, sin, rows, coders, codes) -> dict[str, str]:
    """Kernel vs torch path on the first unit: off-by-one code fractions (encode), max relative error (decode)."""
    from hf_scd import codec, kernels

    args = (keys[:1], values[:1], cos, sin, rows, coders[:1])
    (encoded,), (ref,) = kernels.encode_rows(*args), codec.encode_rows(*args)
    key_code, value_code = coders[0]
    scale_off = sum(float((a != b).float().mean()) for a, b in ((encoded[1], ref[1]), (encoded[3], ref[3]))) / 2
    same = [(a == b).unsqueeze(-1) for a, b in ((encoded[1], ref[1]), (encoded[3], ref[3]))]
    unpacked = [
        (codec.unpack_codes(a, c.layout), codec.unpack_codes(b, c.layout))
        for a, b, c in ((encoded[0], ref[0], key_code), (encoded[2], ref[2], value_code))
    ]
    code_off = sum(
        float(((a != b) & m).sum() / (m.sum() * a.shape[-1])) for (a, b), m in zip(unpacked, same, strict=True)
    )
    first, members = keys[0][0], len(keys[0])
    outputs = torch.empty(2, 2, members, *first.shape, dtype=first.dtype, device=first.device)
    for (out_keys, out_values), impl in zip(outputs, (kernels, codec), strict=True):
        impl.decode_rows(codes[:1], cos, sin, rows, coders[:1], [list(out_keys)], [list(out_values)])
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(*outputs, strict=True))
    return {"encode": f"scales {scale_off:.1e}, codes {code_off / 2:.1e}", "decode": f"max rel err {err:.1e}"}


def _prefill_ms(device: torch.device) -> float:
    """Median ms of an 8K-token forward (no cache, last logits only) of a random-weight Llama-3-8B-shaped model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=PREFILL_TOKENS, rope_theta=500000.0,
    )  # fmt: skip
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    ids = torch.randint(0, config.vocab_size, (1, PREFILL_TOKENS), device=device)
    times = []
    with torch.inference_mode():
        for _ in range(4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    del model
    torch.cuda.empty_cache()
    return sorted(times[1:])[1]  # first run warms up


def _table(rows: list[dict], copy_gbps: float) -> str:
    lines = [
        f"Device-to-device copy: {copy_gbps:.0f} GB/s (read + write). "
        "Bytes moved = K/V + codes/scales + cos/sin, all layers.",
        "",
        "| model | tokens | kernel | time (ms) | MB moved | GB/s | of copy BW | torch (ms) | speedup | vs torch |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['kernel']} | {r['ms']:.3f} | {r['mb']:.1f} | {r['gbps']:.0f} | "
            f"{r['copy_frac']:.0%} | {r['torch_ms']:.2f} | {r['speedup']:.1f}x | {r['check']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally write as markdown) the kernel tables; exits 0 without a GPU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the tables to this markdown file")
    parser.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    parser.add_argument("--no-prefill", action="store_true", help="skip the Llama-3-8B prefill comparison")
    args = parser.parse_args(argv)

    from hf_scd import kernels

    if not kernels.available():
        print("hf_scd.kernels.bench: needs triton and a CUDA GPU; none here, nothing to benchmark.")
        return 0
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    copy_gbps = _copy_bandwidth(device)
    rows = []
    for name in SHAPES:
        for tokens in args.contexts:
            start = time.perf_counter()
            rows.extend(_model_rows(name, tokens, device, copy_gbps))
            torch.cuda.empty_cache()
            print(f"  {name} {tokens} tokens: {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    text = _table(rows, copy_gbps)

    if not args.no_prefill:
        try:
            llama = [r for r in rows if r["model"] == "Llama-3-8B" and r["tokens"] == PREFILL_TOKENS]
            if not llama:
                llama = _model_rows("Llama-3-8B", PREFILL_TOKENS, device, copy_gbps)
                torch.cuda.empty_cache()
            decode_ms = next(r["ms"] for r in llama if r["kernel"] == "decode_units")
            prefill = _prefill_ms(device)
            text += (
                f"\n\nLlama-3-8B, 8K tokens: decode of the whole cache {decode_ms:.2f} ms vs prefill {prefill:.0f} ms "
                f"(1% = {prefill / 100:.2f} ms): decode is {decode_ms / prefill:.2%} of prefill."
            )
        except Exception as error:  # noqa: BLE001 - an OOM here must not lose the kernel tables
            text += f"\n\nPrefill comparison skipped: {type(error).__name__}: {error}"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# hf_scd kernel benchmark ({torch.cuda.get_device_name()})\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
