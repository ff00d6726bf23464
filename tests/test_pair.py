"""Cross-variant SCD on a real pair: SmolLM2-135M-Instruct (producer) -> its LoRA fine-tune on stdlib docstrings
(consumer, base + the adapter shipped in hub_artifacts/), with the shipped pair artifacts."""

from pathlib import Path

import pytest
import torch

from hf_scd import ArtifactMismatchError, SCDArtifacts, SCDCache, SCDPayload
from hf_scd.compat import with_cache
from hf_scd.eval.corpus import evaluation_texts, token_documents
from hf_scd.eval.metrics import next_token_kl, top1_agreement
from hf_scd.prefill import prefill

HUB = Path(__file__).resolve().parents[1] / "hub_artifacts"
PAIR = HUB / "smollm2-135m-instruct-stdlib-pair"
PREFIX, CONTINUATION = 384, 128
# Measured on these three held-out documents at the shipped default point (8x, 3-layer joint units): naive reuse KL
# 0.0424, SCD 0.0267 (mean, a ratio of 1.59), top-1 0.900 vs 0.916. The test asks for 1.5 so that other CPUs'
# rounding cannot flip it.
NAIVE_OVER_SCD = 1.5
DOCS = 3


@pytest.fixture(scope="module")
def variant():
    from hf_scd.models import load_model

    return load_model("smollm2-135m-instruct-stdlib")[0]


@pytest.fixture(scope="module")
def pair_artifacts():
    return SCDArtifacts.from_pretrained(PAIR)


@torch.inference_mode()
def test_scd_beats_naive_reuse_and_generation_continues(smollm2, variant, pair_artifacts, chat_ids):
    producer, tokenizer = smollm2
    docs = token_documents(tokenizer, evaluation_texts(), PREFIX + CONTINUATION)[:DOCS]
    kl, top1 = {"naive": [], "scd": []}, {"naive": [], "scd": []}
    for doc in docs:
        ids = torch.tensor([doc[: PREFIX + CONTINUATION]])
        oracle = variant(ids).logits[:, PREFIX:-1]
        naive = prefill(producer, ids[:, :PREFIX], None)
        shipped = SCDCache(pair_artifacts, producer)
        producer(ids[:, :PREFIX], **with_cache(producer, shipped))
        blob = shipped.encode().to_bytes()
        rebuilt = SCDCache.from_payload(SCDPayload.from_bytes(blob), pair_artifacts, variant)
        for name, cache in (("naive", naive), ("scd", rebuilt)):
            logits = variant(ids[:, PREFIX:], **with_cache(variant, cache)).logits[:, :-1]
            kl[name].append(next_token_kl(oracle, logits))
            top1[name].append(top1_agreement(oracle, logits))
    mean = {name: (sum(kl[name]) / DOCS, sum(top1[name]) / DOCS) for name in kl}
    assert mean["scd"][0] * NAIVE_OVER_SCD < mean["naive"][0], mean
    assert mean["scd"][1] > mean["naive"][1], mean

    shipped = SCDCache(pair_artifacts, producer)
    producer(chat_ids[:, :-1], **with_cache(producer, shipped))
    rebuilt = SCDCache.from_payload(SCDPayload.from_bytes(shipped.encode().to_bytes()), pair_artifacts, variant)
    out = variant.generate(chat_ids, **with_cache(variant, rebuilt), max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, chat_ids.shape[1] :], skip_special_tokens=True).strip()


@torch.inference_mode()
def test_wrong_models_and_payloads_are_refused(smollm2, variant, pair_artifacts, artifacts, chat_ids):
    producer, _ = smollm2
    with pytest.raises(ArtifactMismatchError, match="weights differ"):  # same-model artifacts of the base
        SCDCache(artifacts, variant, strict=True)  # (without strict they fit it: test_fit_probe.py)
    shipped = SCDCache(pair_artifacts, producer)
    producer(chat_ids, **with_cache(producer, shipped))
    with pytest.raises(ArtifactMismatchError, match="consumer of a pair"):
        SCDCache.from_payload(shipped.encode(), pair_artifacts, producer)
    with pytest.raises(ArtifactMismatchError, match="fitted on"):  # another pair's artifacts
        SCDCache(SCDArtifacts.from_pretrained(HUB / "qwen2.5-coder-0.5b-instruct-stdlib-pair"), producer)
    same_model = SCDCache(artifacts, producer)
    producer(chat_ids, **with_cache(producer, same_model))
    with pytest.raises(ArtifactMismatchError, match="load the same artifacts"):
        SCDCache.from_payload(same_model.encode(), pair_artifacts, variant)
