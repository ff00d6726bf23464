"""The model card (README.md) of an artifact repo: Hub metadata, what it was fitted on, its fidelity table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

from ..probe import FIT_TOLERANCE, mean_error
from ..schema import ArtifactsConfig, CodecConfig

if TYPE_CHECKING:
    from ..artifacts import SCDArtifacts

LIBRARY_NAME = "hf-scd"
LICENSE = "apache-2.0"
TAGS = ("hf-scd", "kv-cache", "kv-cache-compression")


def _what(artifacts: SCDArtifacts) -> str:
    """The card's opening: what the tensors are and which weights they were fitted on."""
    config, shape = artifacts.config, artifacts.shape
    cache = (
        f"`{shape.model_type}` KV cache ({shape.num_layers} layers x {shape.num_kv_heads} KV heads x "
        f"{shape.head_dim} dims, {shape.bf16_bytes_per_token()} bytes/token in BF16)"
    )
    unit = _unit(config)
    if not artifacts.is_pair:
        return f"""Calibration for [hf-scd](https://github.com/hf-scd/hf-scd) (Semantic Cache Distillation): {unit},
a principal basis of the de-rotated keys (weighted by query energy) and of the values (weighted by the output
projection), quantizer steps, and a bit-allocation plan, so that a {cache} ships as compact codes.

{_fit(config)}{_check(config)}"""
    producer, consumer = config.model, config.consumer
    patch = (
        """ On the Patch
layers of a point, the producer ships a code of its normalised attention input instead and the consumer recomputes
K/V with its own projections."""
        if _patched(config)
        else ""
    )
    return f"""Cross-variant calibration for [hf-scd](https://github.com/hf-scd/hf-scd) (Semantic Cache Distillation): a
{cache} prefilled by **{producer.name}** (the producer) ships as compact codes to **{consumer.name}** (the
consumer, a fine-tune with other weights), which continues from it. {unit[0].upper() + unit[1:]}, a Reuse coder reads
the producer's de-rotated keys and values and its decoder predicts the consumer's ({config.codec.reuse}).{patch} The
plan ({"Patch layers, " if patch else ""}bits per component) was validated point by point.

Producer weights fingerprint `{producer.fingerprint}`, consumer `{consumer.fingerprint}`: other weights on
either side raise `ArtifactMismatchError`, as does the producer rebuilding a payload meant for the consumer."""


def _patched(config: ArtifactsConfig) -> bool:
    return any(point.patch_layers for point in config.operating_points)


def _fit(config: ArtifactsConfig) -> str:
    """Which weights same-model artifacts accept: the fitted ones, and those the fit probe finds the codes fit."""
    fingerprint, probe = config.model.fingerprint, config.fit_probe
    if probe is None:
        return f"""Fitted on weights with fingerprint `{fingerprint}`; using these artifacts with other weights (for
example a fine-tuned variant) raises `ArtifactMismatchError`."""
    return f"""Fitted on weights with fingerprint `{fingerprint}`. Other weights (this model in another precision or
requantized, say) are accepted with an `ArtifactFitWarning` where a probe through the codes of point `{probe.point}`
reconstructs their K/V, in every layer, within +{FIT_TOLERANCE:.0%} of the relative error measured on the fitted
weights (mean {mean_error(probe.errors):.4g}); weights the codes do not fit raise `ArtifactMismatchError`, and under
`strict=True` so do all weights but the fitted ones. A payload rebuilds only on the weights that made it."""


def _unit(config: ArtifactsConfig) -> str:
    """What one coder covers: a layer's KV heads one by one, or a run of layers' heads jointly."""
    codec = config.codec
    if not codec.joint_basis:
        return "per layer and KV head"
    if codec.unit_layers == 1:
        return "per layer, jointly over its KV heads"
    return f"per unit of {codec.unit_layers} consecutive layers, jointly over all their KV heads"


def _check(config: ArtifactsConfig) -> str:
    """What a `max_kl` check predicts a request's KL from, where the artifacts carry a fidelity map."""
    fidelity = config.fidelity
    if fidelity is None:
        return ""
    tail = (
        ""
        if fidelity.tail is None
        else f", and from the KL of the request's last {fidelity.tail.tokens} tokens over the rebuilt cache (the "
        "largest prediction counts, and never less than that KL itself)"
    )
    return f"""

`max_kl` checks (`cache.encode(max_kl=...)`) predict a request's next-token KL over {fidelity.continuation}
continuation tokens from the weighted distortion of its codes{tail}; fitted on {fidelity.samples} (document, point)
pairs of held-out text."""


def _sink(codec: CodecConfig) -> str:
    if codec.recomputed_tokens:
        return (
            f"The consumer recomputes the first {codec.recomputed_tokens} token(s) of each sequence "
            "(the attention sink) itself."
        )
    return (
        f"The first {codec.exact_tokens} token(s) of each sequence (the attention sink) ship exactly in "
        "BF16 on top of that."
    )


def _calibration(config: ArtifactsConfig) -> str:
    calibration = config.calibration
    return f"""## Calibration data

{calibration["data"]} ({calibration["documents"]} documents, {calibration["tokens"]} tokens). Operating points were
validated on {calibration["validation_documents"]} held-out documents that share no text with the calibration data."""


def _points(artifacts: SCDArtifacts) -> str:
    """The table of operating points: size and validation fidelity, Patch layers where a point has some, the
    default marked."""
    patched, default = _patched(artifacts.config), artifacts.config.default_point
    rows = "\n".join(
        f"| `{p.name}` | {p.bytes_per_token:.0f} | {p.ratio_vs_bf16:.2f}x | {p.val_kl:.4f} | {p.val_top1:.3f} |"
        + (f" {', '.join(map(str, p.patch_layers)) or '–'} |" if patched else "")
        + (" default |" if p.name == default else " |")
        for p in artifacts.points
    )
    patch_column = (" Patch layers |", "---|") if patched else ("", "")
    return f"""## Operating points

KL(oracle || SCD) and top-1 agreement of next-token predictions on held-out text, the consumer continuing from the
shipped cache; bytes are K/V codes and scales per token. {_sink(artifacts.config.codec)}

| point | bytes/token | vs BF16 | val KL | val top-1 |{patch_column[0]} |
|---|---|---|---|---|{patch_column[1]}---|
{rows}"""


USAGE = """## Use

```python
from hf_scd import SCDArtifacts, SCDCache, SCDPayload

artifacts = SCDArtifacts.from_pretrained("<this repo>")
cache = SCDCache(artifacts, model={producer}, ratio={ratio})  # or {alternatives}
{producer}(prompt_ids, cache=cache)  # past_key_values=cache before transformers 5.24
blob = cache.encode().to_bytes()
# on the consumer
cache = SCDCache.from_payload(SCDPayload.from_bytes(blob), artifacts, model={consumer})
{consumer}.generate(full_ids, cache=cache, max_new_tokens=64)
```
"""


def _usage(artifacts: SCDArtifacts) -> str:
    """The usage snippet: one model on both sides, or a pair's producer and consumer (which has no max_kl check)."""
    if artifacts.is_pair:
        return USAGE.format(
            producer="producer", consumer="consumer", ratio=8, alternatives='point="8x"; a pair has no max_kl check'
        )
    return USAGE.format(producer="model", consumer="model", ratio=4, alternatives='max_kl=0.01, or point="4x"')


def card_data(artifacts: SCDArtifacts) -> ModelCardData:
    """The card's Hub metadata: what the Hub files the repo under, and the model it was fitted on."""
    return ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=artifacts.config.model.base_model,
        license=LICENSE,
        tags=list(TAGS),
    )


def model_card(artifacts: SCDArtifacts) -> str:
    """The README.md of an artifact repo: Hub metadata and what the artifacts are, what they were fitted on, their
    operating points and how to use them."""
    sections = (f"# SCD artifacts for {artifacts.describe()}", _what(artifacts), _calibration(artifacts.config))
    body = "\n\n".join((*sections, _points(artifacts), _usage(artifacts)))
    return str(ModelCard(f"---\n{card_data(artifacts).to_yaml()}\n---\n\n{body}"))
