"""How wrong is a base model's KV cache for a fine-tuned variant? (naive cache reuse, teacher-forced)

A producer/consumer pair is only a useful test of cache shipping if reusing the producer's cache as-is costs the
consumer something. On held-out docs (prefix 512 tokens, next 256 teacher-forced) this compares the variant
continuing from the BASE model's cache of the prefix with the variant prefilling the whole doc itself (the oracle),
and prints KL(oracle || naive), top-1 agreement and the continuation NLL of both. For scale it also scores the
variant with no prefix at all and the base model run on the whole doc (the producer answering instead).

    python scripts/naive_reuse_check.py --base smollm2-135m-instruct --variant smollm2-135m-instruct-stdlib
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import DynamicCache

from hf_scd.compat import with_cache
from hf_scd.eval.corpus import evaluation_texts, token_documents
from hf_scd.eval.metrics import mean_nll, next_token_kl, top1_agreement
from hf_scd.models import load_model, load_with_lora

PREFIX, CONT = 512, 256


def load_pair(base: str, variant: str | None, adapter: Path | None):
    base_model, tokenizer = load_model(base, dtype=torch.float32)
    if adapter is None:
        return base_model, load_model(variant, dtype=torch.float32)[0], tokenizer
    return base_model, load_with_lora(base, adapter, torch.float32)[0], tokenizer


@torch.inference_mode()
def check(base_model, variant, docs: list[list[int]]) -> dict[str, dict[str, float]]:
    """Per method (naive, no_prefix, base_model): kl, top1, nll vs the variant oracle, position-weighted over docs."""
    rows: dict[str, list[torch.Tensor]] = {"naive": [], "no_prefix": [], "base_model": []}
    oracles, targets = [], []
    for doc in docs:
        ids = torch.tensor([doc[: PREFIX + CONT]])
        prefix, cont = ids[:, :PREFIX], ids[:, PREFIX:]
        # Scored positions predict cont[1:]; cont[0] is predicted by the prefill, whoever runs it.
        oracles.append(variant(ids, logits_to_keep=CONT).logits[0, :-1])
        targets.append(cont[0, 1:])
        base_cache = DynamicCache(config=base_model.config)
        base_model(prefix, **with_cache(base_model, base_cache))
        rows["naive"].append(variant(cont, **with_cache(variant, copy.deepcopy(base_cache))).logits[0, :-1])
        rows["no_prefix"].append(variant(cont).logits[0, :-1])
        rows["base_model"].append(base_model(ids, logits_to_keep=CONT).logits[0, :-1])
    oracle, target = torch.cat(oracles), torch.cat(targets)
    results = {"oracle": {"kl": 0.0, "top1": 1.0, "nll": mean_nll(oracle, target)}}
    for name, logits in rows.items():
        test = torch.cat(logits)
        results[name] = {
            "kl": next_token_kl(oracle, test),
            "top1": top1_agreement(oracle, test),
            "nll": mean_nll(test, target),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--variant", default="smollm2-135m-instruct-stdlib", help="variant name or model folder")
    parser.add_argument("--adapter", type=Path, help="a LoRA folder to apply to --base instead of --variant")
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base_model, variant, tokenizer = load_pair(args.base, args.variant, args.adapter)
    docs = token_documents(tokenizer, evaluation_texts(), PREFIX + CONT)[: args.docs]
    results = check(base_model, variant, docs)
    name = args.adapter or args.variant
    print(f"{args.base} cache -> {name}, {len(docs)} docs, prefix {PREFIX}, {CONT - 1} scored positions each")
    print(f"{'method':<12} {'KL(oracle||m)':>14} {'top-1':>7} {'NLL':>7}")
    for method, r in results.items():
        print(f"{method:<12} {r['kl']:>14.4f} {r['top1']:>7.3f} {r['nll']:>7.4f}")


if __name__ == "__main__":
    main()
