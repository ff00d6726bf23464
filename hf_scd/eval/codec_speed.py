"""CPU codec throughput against the model's own prefill: can one core code K/V as fast as the model makes it?

    python -m hf_scd.eval.codec_speed [--tokens 512,2048,4096] [--points 4x,8x] [--repeats 7] [--entropy] [--max-kl X]

For SmolLM2-135M with its real artifacts, on real held-out text, one torch thread (run it pinned: `taskset -c 1`),
the median time of: the prefill forward into an `SCDCache`; the one-shot encode (cache -> payload bytes) and decode
(bytes -> rebuilt cache); and the streamed path, layer by layer (`Plan.encode_layer` and the frame's bytes on the
producer, `layer_from_bytes` and `CacheRebuild.add_layer` on the consumer). With `--entropy`, the same four stages
with the entropy stage (`hf_scd.entropy`) included: `compress_payload` after the encode and `decompress_payload`
before the decode, `compress_layer` / `decompress_layer` per frame. With `--max-kl`, also what a producer that checks
each request pays: `encode(max_kl=...)` to bytes (the points it checks, each encoded and decoded once). Throughput
is in GB/s of the bf16 K/V those tokens take (2 x layers x tokens x kv_heads x head_dim x 2 bytes), the prefill's
too: the K/V it produces.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..artifacts import SCDArtifacts
from ..cache import CacheRebuild, SCDCache
from ..compat import with_cache
from ..entropy import compress_layer, compress_payload, decompress_layer, decompress_payload
from ..models import load_model
from ..payload import SCDPayload, layer_from_bytes, layer_to_bytes
from .corpus import evaluation_texts

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "hub_artifacts" / "smollm2-135m-instruct"
STAGES = ("encode", "decode", "stream_encode", "stream_decode")
ENTROPY_STAGES = tuple(f"{stage}+zstd" for stage in STAGES)


def median_ms(repeats: int, run: Callable[..., object], *args) -> float:
    """Median wall time of `repeats` calls of `run(*args)` after one warm-up call."""
    run(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def prefilled(model, artifacts: SCDArtifacts, prompt: torch.Tensor) -> SCDCache:
    cache = SCDCache(artifacts, model)
    model(prompt, **with_cache(model, cache))
    cache.close()
    return cache


def encode(cache: SCDCache, point: str, entropy: bool = False) -> bytes:
    payload = cache.encode(point, packed=not entropy)
    return compress_payload(payload, cache.artifacts) if entropy else payload.to_bytes()


def stream_encode(cache: SCDCache, point: str, entropy: bool = False) -> list[bytes]:
    """What a `CacheSender` does per layer once the forward is done: each layer's codes as its frame's body."""
    plan = cache.artifacts.plan(point, cache.layers[0].keys.device)
    tokens = plan.layout(cache.record)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    codes = (plan.encode_layer(index, kv, tokens, packed=not entropy) for index in range(len(kv)))
    if entropy:
        return [compress_layer(layer, plan, index) for index, layer in enumerate(codes)]
    return [layer_to_bytes(layer) for layer in codes]


def stream_decode(
    payload: SCDPayload, bodies: list[bytes], artifacts: SCDArtifacts, model, entropy: bool = False
) -> SCDCache:
    """What `receive_cache` does with a stream: each frame's codes read, checked and decoded as it arrives."""
    head = payload.head
    with CacheRebuild(head, artifacts, model) as rebuild:
        for index, body in enumerate(bodies):
            if entropy:
                layer = decompress_layer(body, rebuild.plan, index, head.num_tokens)
            else:
                layer = layer_from_bytes(body, index, head.num_tokens)
            rebuild.add_layer(index, layer)
        cache = rebuild.finish()
    cache.close()
    return cache


def checked_encode(cache: SCDCache, max_kl: float) -> bytes:
    return cache.encode(max_kl=max_kl).to_bytes()


def decode(blob: bytes, artifacts: SCDArtifacts, model, entropy: bool = False) -> SCDCache:
    payload = decompress_payload(blob, artifacts) if entropy else SCDPayload.from_bytes(blob)
    cache = SCDCache.from_payload(payload, artifacts, model)
    cache.close()
    return cache


def measure(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("default")
    artifacts = SCDArtifacts.from_pretrained(ARTIFACTS)
    text = "\n\n".join(evaluation_texts())
    all_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    rows = []
    for tokens in args.tokens:
        prompt = all_ids[:, :tokens]
        kv_bytes = tokens * artifacts.shape.bf16_bytes_per_token()
        prefill_ms = median_ms(args.prefill_repeats, prefilled, model, artifacts, prompt)
        cache = prefilled(model, artifacts, prompt)
        checked = {}
        if args.max_kl is not None:
            checked = {
                "max_kl": args.max_kl,
                "checked_point": cache.encode(max_kl=args.max_kl).operating_point,
                "checked_encode_ms": median_ms(args.repeats, checked_encode, cache, args.max_kl),
            }
        for point in args.points:
            times, sizes = {}, {}
            payload = cache.encode(point)  # the stream's head, for its decode
            for entropy in (False, True) if args.entropy else (False,):
                suffix = "+zstd" if entropy else ""
                blob = encode(cache, point, entropy)
                bodies = stream_encode(cache, point, entropy)
                sizes[f"payload{suffix}"] = len(blob)
                sizes[f"stream{suffix}"] = sum(map(len, bodies))
                times |= {
                    f"encode{suffix}": median_ms(args.repeats, encode, cache, point, entropy),
                    f"decode{suffix}": median_ms(args.repeats, decode, blob, artifacts, model, entropy),
                    f"stream_encode{suffix}": median_ms(args.repeats, stream_encode, cache, point, entropy),
                    f"stream_decode{suffix}": median_ms(
                        args.repeats, stream_decode, payload, bodies, artifacts, model, entropy
                    ),
                }
            row = {
                "tokens": tokens,
                "point": point,
                "kv_bytes_bf16": kv_bytes,
                **{f"{part}_bytes": size for part, size in sizes.items()},
                "prefill_ms": prefill_ms,
                "prefill_tokens_per_s": tokens / prefill_ms * 1e3,
                "prefill_gbps": kv_bytes / prefill_ms / 1e6,
                **{f"{stage}_ms": ms for stage, ms in times.items()},
                **{f"{stage}_gbps": kv_bytes / ms / 1e6 for stage, ms in times.items()},
                **checked,
                "threads": args.threads,
                "repeats": args.repeats,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per prompt and point, ms and GB/s of bf16-equivalent K/V for every stage measured, the prefill
    alongside."""
    stages = [stage for stage in STAGES + ENTROPY_STAGES if f"{stage}_ms" in rows[0]]
    checked = "checked_encode_ms" in rows[0]
    head = "| tokens | point | prefill ms (tok/s, GB/s K/V) | " + " | ".join(f"{s} ms (GB/s)" for s in stages)
    head += " | encode(max_kl) ms (point shipped) |" if checked else " |"
    lines = [head, "|" + "---:|" * (3 + len(stages) + checked)]
    for row in rows:
        prefill = f"{row['prefill_ms']:.0f} ({row['prefill_tokens_per_s']:.0f}, {row['prefill_gbps']:.3f})"
        cells = " | ".join(f"{row[f'{s}_ms']:.1f} ({row[f'{s}_gbps']:.2f})" for s in stages)
        if checked:
            cells += f" | {row['checked_encode_ms']:.0f} ({row['checked_point']})"
        lines.append(f"| {row['tokens']} | {row['point']} | {prefill} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 4096])
    parser.add_argument("--points", type=lambda s: s.split(","), default=["4x", "8x"])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each codec stage (median)")
    parser.add_argument("--prefill-repeats", type=int, default=3, help="timed prefills per prompt (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--entropy", action="store_true", help="also every stage with the entropy stage included")
    parser.add_argument("--max-kl", type=float, default=None, help="also encode(max_kl=...): the per-request check")
    parser.add_argument("--out", default="benchmarks/codec_speed_smollm2-135m-instruct.json")
    args = parser.parse_args(argv)
    with torch.inference_mode():
        rows = measure(args)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
