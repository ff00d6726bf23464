"""The entropy stage on whole payloads: how many times smaller than BF16 a payload is with and without it, and what
compressing and decompressing cost, beside the codec's own encode and decode of the same cache.

For a model with its shipped artifacts, on the first `--tokens` tokens of the held-out text, at each point: the
payload's bytes (`cache.encode(point).to_bytes()`), the bytes of `hf_scd.entropy.compress_payload` of it (checked to
decompress to the same bytes), the bytes of its layer frames as a stream sends them with `entropy=True` against
plain, and the median of `--repeats` timings of each step (after a warm-up).

    python scripts/entropy_payload_check.py --tokens 2048 --threads 2
    python scripts/entropy_payload_check.py --artifacts hub_artifacts/qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_scd import SCDArtifacts, SCDCache, SCDPayload
from hf_scd.compat import with_cache
from hf_scd.entropy import compress_layer, compress_payload, decompress_payload
from hf_scd.eval.codec_speed import encode, median_ms
from hf_scd.eval.corpus import evaluation_texts
from hf_scd.models import load_model
from hf_scd.payload import layer_to_bytes

REPO = Path(__file__).resolve().parents[1]


def stream_frames(payload: SCDPayload, artifacts: SCDArtifacts) -> tuple[int, int]:
    """Bytes of the payload's layer frame bodies as a stream sends them: plain, and with `entropy=True` (each layer
    that ends a Reuse unit through `compress_layer`)."""
    plan = artifacts.plan(payload.operating_point)
    plain = sum(len(layer_to_bytes(layer)) for layer in payload.layers)
    return plain, sum(len(compress_layer(layer, plan, index)) for index, layer in enumerate(payload.layers))


def rebuild(blob: bytes, artifacts: SCDArtifacts, model) -> SCDCache:
    return SCDCache.from_payload(SCDPayload.from_bytes(blob), artifacts, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=REPO / "hub_artifacts" / "smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--points", nargs="+", default=["4x", "8x", "12x"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    artifacts = SCDArtifacts.from_pretrained(args.artifacts)
    model, tokenizer = load_model(artifacts.config.model.name)
    ids = tokenizer("\n\n".join(evaluation_texts()), return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = ids[:, : args.tokens]
    bf16 = ids.shape[1] * artifacts.shape.bf16_bytes_per_token()
    rows = []
    with torch.inference_mode():
        cache = SCDCache(artifacts, model)
        model(ids, **with_cache(model, cache), logits_to_keep=1)
        for point in args.points:
            payload = cache.encode(point)
            blob = payload.to_bytes()
            compressed = compress_payload(payload, artifacts)
            if decompress_payload(compressed, artifacts).to_bytes() != blob:
                raise SystemExit(f"{point}: the entropy stage did not give the payload back")
            frames, coded_frames = stream_frames(payload, artifacts)
            rows.append({
                "point": point,
                "payload_bytes": len(blob),
                "compressed_bytes": len(compressed),
                "stream_frame_bytes": frames,
                "coded_stream_frame_bytes": coded_frames,
                "ratio_vs_bf16": bf16 / len(blob),
                "compressed_ratio_vs_bf16": bf16 / len(compressed),
                "codec_encode_ms": median_ms(args.repeats, encode, cache, point),
                "codec_decode_ms": median_ms(args.repeats, rebuild, blob, artifacts, model),
                "compress_ms": median_ms(args.repeats, compress_payload, payload, artifacts),
                "decompress_ms": median_ms(args.repeats, decompress_payload, compressed, artifacts),
            })  # fmt: skip
    name = artifacts.config.model.name
    print(f"{name}, {ids.shape[1]} tokens, {args.threads} threads; ratios are whole payloads against BF16 K/V")
    print(
        "| point | payload | with the entropy stage | stream frames coded / plain | codec enc / dec ms "
        "| stage compress / decompress ms |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['point']} | {r['ratio_vs_bf16']:.2f}x | {r['compressed_ratio_vs_bf16']:.2f}x | "
            f"{r['coded_stream_frame_bytes'] / r['stream_frame_bytes']:.3f} | "
            f"{r['codec_encode_ms']:.0f} / {r['codec_decode_ms']:.0f} | "
            f"{r['compress_ms']:.0f} / {r['decompress_ms']:.0f} |"
        )
    out = args.json or REPO / "benchmarks" / f"entropy_payload_{name}.json"
    out.write_text(json.dumps({"tokens": ids.shape[1], "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
