"""The model card (README.md) of an artifact repo: Hub metadata, what it was fitted on, its fidelity table."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..artifacts import SCDArtifacts


def model_card(artifacts: SCDArtifacts) -> str:
    config = artifacts.config
    model = config["model"]
    calibration = config["calibration"]
    shape = artifacts.shape
    rows = "\n".join(
        f"| `{p.name}` | {p.bytes_per_token:.0f} | {p.ratio_vs_bf16:.2f}x | {p.val_kl:.4f} | {p.val_top1:.3f} |"
        + (" default |" if p.name == config["default_point"] else " |")
        for p in artifacts.points
    )
    base = f"base_model: {model['base_model']}\n" if model.get("base_model") else ""
    return f"""---
library_name: hf-scd
{base}license: apache-2.0
tags:
- hf-scd
- kv-cache
- kv-cache-compression
---

# SCD artifacts for {model["name"]}

Calibration for [hf-scd](https://github.com/hf-scd/hf-scd) (Semantic Cache Distillation): per layer and KV head, a
principal basis of the de-rotated keys (weighted by query energy) and of the values (weighted by the output
projection), quantizer steps, and a bit-allocation plan, so that a
`{shape.model_type}` KV cache ({shape.num_layers} layers x {shape.num_kv_heads} KV heads x {shape.head_dim} dims,
{shape.bf16_bytes_per_token()} bytes/token in BF16) ships as compact codes.

Fitted on weights with fingerprint `{model["fingerprint"]}`; using these artifacts with other weights (for example a
fine-tuned variant) raises `ArtifactMismatchError`.

## Calibration data

{calibration["data"]} ({calibration["documents"]} documents, {calibration["tokens"]} tokens). Operating points were
validated on {calibration["validation_documents"]} held-out documents that share no text with the calibration data.

## Operating points

KL(oracle || SCD) and top-1 agreement of next-token predictions on held-out text, the consumer continuing from the
shipped cache; bytes are K/V codes and scales per token. The first {config["codec"]["exact_tokens"]} token(s) of each
sequence (the attention sink) ship exactly in BF16 on top of that.

| point | bytes/token | vs BF16 | val KL | val top-1 | |
|---|---|---|---|---|---|
{rows}

## Use

```python
from hf_scd import SCDArtifacts, SCDCache, SCDPayload

artifacts = SCDArtifacts.from_pretrained("<this repo>")
cache = SCDCache(artifacts, model=model, ratio=4)  # or max_kl=0.01, or point="4x"
model(prompt_ids, past_key_values=cache)
blob = cache.encode().to_bytes()
# on the consumer
cache = SCDCache.from_payload(SCDPayload.from_bytes(blob), artifacts, model=model)
model.generate(full_ids, past_key_values=cache, max_new_tokens=64)
```
"""
