"""Record the fit probe in same-model artifacts calibrated before calibration measured it, without calibrating again.

The probe is what `hf-scd calibrate` now records (`hf_scd.probe`): per layer, the relative K/V error through the
codes of the default point on the first `PROBE_TOKENS` tokens of the first validation document, measured on the
model the artifacts were fitted on. This loads that model (it must have the artifacts' fingerprint), measures the
figures, and rewrites the folder's config.json and model card; the tensors, and so the artifacts id, do not change.

    python scripts/add_fit_probe.py hub_artifacts/smollm2-135m-instruct hub_artifacts/qwen2.5-coder-0.5b-instruct

`--measure` writes nothing: it prints the probe figures of copies of the fitted model with other weights (computed in
bf16, int8 per row, 4- and 3-bit blocks, the LoRA variant, layers replaced by noise) against the fitted model's, the
mean and the worst layer, how far their weights moved, and with `--kl` what the codes of the default point do to
each copy's own transfer (KL of it continuing two held-out documents from its own shipped 384-token prefix, against
its own prefill), which is how `FIT_TOLERANCE` was chosen.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from hf_scd import SCDArtifacts
from hf_scd.arch import ModelHandle
from hf_scd.calibrate import validate_points
from hf_scd.calibrate.card import model_card
from hf_scd.eval.corpus import evaluation_texts, token_documents, validation_documents
from hf_scd.eval.weights import requantized, scrambled
from hf_scd.models import VARIANTS, load_model
from hf_scd.probe import FIT_TOLERANCE, PROBE_TOKENS, FitVerdict, mean_error, measure_fit_probe, probe_errors
from hf_scd.schema import KINDS

VALIDATION_PREFIX = 384  # `hf-scd calibrate`'s default --validation-prefix, which picks the validation documents
KL_PREFIX = 384


def fitted_model(artifacts: SCDArtifacts):
    """The packaged model the artifacts were fitted on, checked by fingerprint."""
    model, tokenizer = load_model(artifacts.config.model.name)
    fingerprint = ModelHandle(model).fingerprint
    if fingerprint != artifacts.model_fingerprint:
        raise SystemExit(f"{artifacts.describe()}: loaded {fingerprint}, fitted on {artifacts.model_fingerprint}")
    return model, tokenizer


def probe_ids(artifacts: SCDArtifacts, tokenizer) -> list[int]:
    """The start of the first validation document, as `hf-scd calibrate` chose them for these artifacts."""
    count = artifacts.config.calibration["validation_documents"]
    return validation_documents(tokenizer, VALIDATION_PREFIX, count)[0][:PROBE_TOKENS]


def add_probe(folder: Path) -> None:
    artifacts = SCDArtifacts.from_pretrained(folder)
    if artifacts.is_pair:
        raise SystemExit(f"{folder}: pair artifacts accept their fitted models only and carry no fit probe")
    model, tokenizer = fitted_model(artifacts)
    start = time.perf_counter()
    probe = measure_fit_probe(artifacts, model, probe_ids(artifacts, tokenizer), artifacts.config.default_point)
    seconds = time.perf_counter() - start
    print(f"{folder}: probe at {probe.point}, mean relative error {mean_error(probe.errors):.6g} ({seconds:.1f} s)")
    artifacts.config = replace(artifacts.config, fit_probe=probe)
    artifacts.card = model_card(artifacts)
    artifacts.save_pretrained(folder)
    again = SCDArtifacts.from_pretrained(folder)
    assert again.artifacts_id == artifacts.artifacts_id and again.config.fit_probe == probe


def measure(folder: Path, with_kl: bool) -> None:
    artifacts = SCDArtifacts.from_pretrained(folder)
    model, tokenizer = fitted_model(artifacts)
    ids, point = tuple(probe_ids(artifacts, tokenizer)), artifacts.config.default_point
    layers = artifacts.shape.num_layers
    variant = next(name for name, spec in VARIANTS.items() if spec.base == artifacts.config.model.name)
    copies = {
        "fitted": lambda: model,
        "bf16 compute": lambda: copy.deepcopy(model).to(torch.bfloat16),
        "int8 per row": lambda: requantized(model, bits=8),
        "int8, bf16 compute": lambda: requantized(model, bits=8).to(torch.bfloat16),
        "4-bit blocks of 32": lambda: requantized(model, bits=4, block=32),
        "4-bit blocks of 64": lambda: requantized(model, bits=4, block=64),
        "3-bit blocks of 32": lambda: requantized(model, bits=3, block=32),
        "LoRA variant": lambda: load_model(variant)[0],
        "last layer noise": lambda: scrambled(model, (layers - 1,)),
        "middle layer noise": lambda: scrambled(model, (layers // 2,)),
        "first layer noise": lambda: scrambled(model, (0,)),
        "all layers noise": lambda: scrambled(model, tuple(range(layers))),
    }
    fitted = probe_errors(artifacts, ModelHandle(model), ids, point)
    print(f"{artifacts.describe()}, point {point}, {len(ids)} tokens; the tolerance +{FIT_TOLERANCE:.0%} (worst layer)")
    fitted_kl = transfer_kl(artifacts, model, tokenizer) if with_kl else None
    kl_column = f" {'KL vs fitted':>12s}" if with_kl else ""
    header = f"{'weights':20s} {'moved':>6s} {'mean error':>10s} {'vs fitted':>9s}  {'worst layer':>13s}{kl_column}"
    print(f"  {header}  verdict")
    for name, make in copies.items():
        other = make()
        handle = ModelHandle(other)
        verdict = FitVerdict(point, probe_errors(artifacts, handle, ids, point), fitted)
        layer, kind, excess = verdict.worst
        mean = mean_error(verdict.measured)
        same = " (the fitted weights)" if handle.fingerprint == artifacts.model_fingerprint else ""
        # A bf16 oracle's own rounding moves the KL more than the codes do (CPU, SmolLM2: +15% on the fitted weights).
        bf16 = next(other.parameters()).dtype == torch.bfloat16
        kl = ""
        if with_kl:
            kl = f" {'-':>12s}" if bf16 else f" {transfer_kl(artifacts, other, tokenizer) / fitted_kl - 1:+12.1%}"
        print(
            f"  {name:20s} {moved(model, other):6.2%} {mean:10.6f} {mean / mean_error(fitted) - 1:+9.2%}  "
            f"{excess:+9.1%} {layer:2d} {KINDS[kind]}{kl}  {'fits' if verdict.fits else 'refused'}{same}",
            flush=True,
        )


def transfer_kl(artifacts: SCDArtifacts, model: torch.nn.Module, tokenizer) -> float:
    """KL of `model` continuing two held-out documents from its own prefix shipped at the default point, against its
    own prefill: the artifacts relabelled with these weights' fingerprint, so that no fit check stands in the way of
    measuring what their codes do to them."""
    fingerprint = ModelHandle(model).fingerprint
    relabelled = SCDArtifacts(
        replace(artifacts.config, model=replace(artifacts.config.model, fingerprint=fingerprint)), artifacts.tensors
    )
    docs = [doc[: KL_PREFIX + 64] for doc in token_documents(tokenizer, evaluation_texts(), KL_PREFIX + 64)[:2]]
    results = validate_points(model, relabelled, docs, KL_PREFIX, progress=False)
    return results[relabelled.points.index(relabelled.point(relabelled.config.default_point))][0]


@torch.no_grad()
def moved(model: torch.nn.Module, other: torch.nn.Module) -> float:
    """How far the weight matrices moved: ||W' - W|| / ||W|| over all of them."""
    pairs = [(a.float(), b.float()) for a, b in zip(model.parameters(), other.parameters(), strict=True) if a.ndim == 2]
    return (
        sum(float((b - a).square().sum()) for a, b in pairs) / sum(float(a.square().sum()) for a, _ in pairs)
    ) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="same-model artifact folders")
    parser.add_argument("--measure", action="store_true", help="print the figures of other weights; write nothing")
    parser.add_argument("--kl", action="store_true", help="with --measure: also each copy's transfer KL (slow)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for folder in args.folders:
        if args.measure:
            measure(folder, args.kl)
        else:
            add_probe(folder)


if __name__ == "__main__":
    main()
