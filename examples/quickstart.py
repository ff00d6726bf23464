"""Ship a real prompt's KV cache as SCD codes and continue generation from them, next to the oracle.

    python examples/quickstart.py [--ratio 8]

Producer and consumer run in one process here for a side-by-side view; the bytes handed between them are exactly
what would cross the wire.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hf_scd import SCDArtifacts, SCDCache, SCDPayload
from hf_scd.compat import with_cache
from hf_scd.models import load_model

ARTIFACTS = Path(__file__).resolve().parents[1] / "hub_artifacts" / "smollm2-135m-instruct"
PASSAGE = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven million "
    "square kilometres, of which five and a half million are covered by the rainforest. The region includes "
    "territory belonging to nine nations. The majority of the forest is contained within Brazil, with 60% of the "
    "rainforest, followed by Peru with 13%, Colombia with 10%, and with minor amounts in Bolivia, Ecuador, French "
    "Guiana, Guyana, Suriname, and Venezuela. The rainforest likely formed during the Eocene era, after a global "
    "reduction of tropical temperatures when the Atlantic Ocean had widened sufficiently to provide a warm, moist "
    "climate to the Amazon basin."
)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratio", type=float, default=8.0, help="compress at least this much below BF16")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    model, tokenizer = load_model("default")
    artifacts = SCDArtifacts.from_pretrained(ARTIFACTS)
    context = [{"role": "user", "content": f"{PASSAGE}\n\nWhich country holds most of the Amazon rainforest?"}]
    prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    prefix = prompt[:, :-1]  # the consumer computes the last token itself, then generates

    # Producer: an ordinary prefill into an SCDCache, then codes on the wire.
    producer = SCDCache(artifacts, model=model, ratio=args.ratio)
    model(prefix, **with_cache(model, producer))
    blob = producer.encode().to_bytes()

    # Consumer: rebuild the cache from bytes and continue.
    start = time.perf_counter()
    consumer = SCDCache.from_payload(SCDPayload.from_bytes(blob), artifacts, model=model)
    rebuild_s = time.perf_counter() - start
    start = time.perf_counter()
    model(prefix, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    scd = model.generate(prompt, **with_cache(model, consumer), max_new_tokens=args.max_new_tokens, do_sample=False)
    oracle = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)

    tokens = prefix.shape[1]
    bf16 = artifacts.shape.bf16_bytes_per_token() * tokens
    print(f"model: SmolLM2-135M-Instruct   operating point: {producer.operating_point.name}   prefix: {tokens} tokens")
    print(
        f"payload: {len(blob):,} bytes ({len(blob) / tokens:,.0f} B/token) vs BF16 KV {bf16:,} bytes "
        f"-> {bf16 / len(blob):.2f}x smaller"
    )
    print(
        f"consumer rebuild from codes: {rebuild_s * 1e3:.0f} ms vs re-prefilling the prefix: {prefill_s * 1e3:.0f} ms "
        f"({prefill_s / rebuild_s:.1f}x, this CPU)"
    )
    print("\n--- oracle (consumer prefills the prompt itself) ---")
    print(tokenizer.decode(oracle[0, prompt.shape[1] :], skip_special_tokens=True))
    print("\n--- SCD (consumer continues from the shipped codes) ---")
    print(tokenizer.decode(scd[0, prompt.shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
