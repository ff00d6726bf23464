"""Would an entropy stage pay? Static per-component tables and rANS over the quantized codes, measured.

For SmolLM2-135M with its shipped artifacts, on `--tokens` tokens of held-out text, at each point: the bytes of the
fixed-width packed codes, the order-0 entropy of each component's codes (the most a static per-component table could
save, with tables fitted on this very request), and the time `constriction`'s rANS coder (a well-kept library,
Rust; `pip install constriction`) takes to encode and decode those codes with one categorical table per component,
beside the codec's own encode and decode of the same cache. The link speed below which the stage saves more wire
time than it costs (encode + decode) is printed last.

    python scripts/entropy_stage_check.py --tokens 2048 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from hf_scd import SCDArtifacts, SCDCache, SCDPayload
from hf_scd.codec import unpack_codes
from hf_scd.compat import with_cache
from hf_scd.eval.corpus import evaluation_texts
from hf_scd.models import load_model

REPO = Path(__file__).resolve().parents[1]


def component_codes(payload: SCDPayload, artifacts: SCDArtifacts, point: str) -> list[tuple[np.ndarray, int]]:
    """Every kept component's codes over the tokens, with its bit width."""
    plan = artifacts.plan(point, torch.device("cpu"))
    out = []
    for unit in plan.units:
        layer = payload.layers[unit.members[-1]]
        for code, packed in ((unit.key, layer.key_codes), (unit.value, layer.value_codes)):
            codes = unpack_codes(packed, code.layout).reshape(packed.shape[0], -1).numpy()
            bits = code.bits.reshape(-1).long().numpy()
            out += [(codes[:, j].astype(np.int32), int(bits[j])) for j in np.nonzero(bits)[0]]
    return out


def best_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def measure(cache: SCDCache, artifacts: SCDArtifacts, model, point: str, repeats: int) -> dict:
    import constriction

    blob = cache.encode(point).to_bytes()
    payload = SCDPayload.from_bytes(blob)
    components = component_codes(payload, artifacts, point)
    fixed_bits = sum(len(c) * bits for c, bits in components)
    entropy_bits = 0.0
    models = []
    for codes, bits in components:
        counts = np.bincount(codes, minlength=1 << bits).astype(np.float64)
        p = counts[counts > 0] / len(codes)
        entropy_bits += float(-(counts[counts > 0] * np.log2(p)).sum())
        table = (counts + 0.01) / (counts + 0.01).sum()  # what a static table would give every symbol a share
        models.append((codes, constriction.stream.model.Categorical(table, perfect=False)))

    def entropy_encode() -> np.ndarray:
        coder = constriction.stream.stack.AnsCoder()
        for codes, model_ in reversed(models):
            coder.encode_reverse(codes, model_)
        return coder.get_compressed()

    compressed = entropy_encode()

    def entropy_decode() -> None:
        coder = constriction.stream.stack.AnsCoder(compressed)
        for codes, model_ in models:
            assert np.array_equal(coder.decode(model_, len(codes)), codes)

    def codec_decode() -> None:
        SCDCache.from_payload(SCDPayload.from_bytes(blob), artifacts, model).close()

    return {
        "point": point,
        "payload_bytes": len(blob),
        "fixed_code_bytes": fixed_bits / 8,
        "order0_bytes": entropy_bits / 8,
        "rans_bytes": int(compressed.nbytes),
        "codec_encode_ms": best_ms(lambda: cache.encode(point).to_bytes(), repeats),
        "codec_decode_ms": best_ms(codec_decode, repeats),
        "rans_encode_ms": best_ms(entropy_encode, repeats),
        "rans_decode_ms": best_ms(entropy_decode, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--points", nargs="+", default=["4x", "8x", "12x"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "entropy_stage_smollm2-135m-instruct.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    artifacts = SCDArtifacts.from_pretrained(REPO / "hub_artifacts" / "smollm2-135m-instruct")
    model, tokenizer = load_model("default")
    ids = tokenizer("\n\n".join(evaluation_texts()), return_tensors="pt", add_special_tokens=False)["input_ids"]
    rows = []
    with torch.inference_mode():
        cache = SCDCache(artifacts, model)
        model(ids[:, : args.tokens], **with_cache(model, cache), logits_to_keep=1)
        for point in args.points:
            rows.append(measure(cache, artifacts, model, point, args.repeats))
    print(f"{args.tokens} tokens, {args.threads} threads")
    print("| point | packed codes MB | order-0 | rANS | codec enc / dec ms | rANS enc / dec ms | pays below |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        saved = row["fixed_code_bytes"] - row["rans_bytes"]
        cost_s = (row["rans_encode_ms"] + row["rans_decode_ms"]) / 1e3
        row["break_even_mbit_s"] = saved * 8 / 1e6 / cost_s
        fixed = row["fixed_code_bytes"]
        print(
            f"| {row['point']} | {fixed / 1e6:.2f} | {fixed / row['order0_bytes']:.3f}x "
            f"| {fixed / row['rans_bytes']:.3f}x | {row['codec_encode_ms']:.0f} / "
            f"{row['codec_decode_ms']:.0f} | {row['rans_encode_ms']:.0f} / {row['rans_decode_ms']:.0f} | "
            f"{row['break_even_mbit_s']:.0f} Mbit/s |"
        )
    args.json.write_text(json.dumps({"tokens": args.tokens, "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
