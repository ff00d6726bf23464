"""Add the fidelity map to same-model artifacts calibrated before calibration fitted it, without calibrating again.

The map is what `hf-scd calibrate` now records (`hf_scd.calibrate.fidelity`): the query energy of the key metric
and each layer's sensitivity, remeasured here on the calibration text `hf-scd calibrate` chose for these artifacts
(the same steps, `collect`, `measure_metrics`, `weigh_layers`), and the log-log line from the weighted distortion
of each point's codes to the KL of the continuation, on the last `--docs` held-out documents (calibration's own
validation documents and those before them; `hf-scd eval` and `scripts/fidelity_check.py` read from the first).
It rewrites config.json; the tensors, and so the artifacts id, do not change.

    python scripts/add_fidelity_map.py hub_artifacts/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from add_fit_probe import VALIDATION_PREFIX, fitted_model

from hf_scd import SCDArtifacts
from hf_scd.arch import ModelHandle
from hf_scd.calibrate.card import model_card
from hf_scd.calibrate.fidelity import continuation_of, fidelity_metric, fit_fidelity_map
from hf_scd.calibrate.pipeline import Calibration, Job, collect, measure_metrics, weigh_layers
from hf_scd.calibrate.plan import measure_points
from hf_scd.eval.corpus import calibration_documents, calibration_texts, validation_documents


def add_map(folder: Path, docs: int) -> None:
    artifacts = SCDArtifacts.from_pretrained(folder)
    if artifacts.is_pair:
        raise SystemExit(f"{folder}: a pair's producer cannot measure the consumer's distortion; no fidelity map")
    model, tokenizer = fitted_model(artifacts)
    calibration = artifacts.config.calibration
    start = time.perf_counter()
    job = Job(
        model,
        model,
        calibration_documents(tokenizer, calibration_texts(), calibration["tokens"], 1024),
        validation_documents(tokenizer, VALIDATION_PREFIX, calibration["validation_documents"]),
        model_name=artifacts.config.model.name,
        ratios=(),
        exact_tokens=artifacts.config.codec.exact_tokens,
    )
    run = Calibration(job, ModelHandle(model))
    for step in (collect, measure_metrics, weigh_layers):
        step(run)
    map_docs = validation_documents(tokenizer, VALIDATION_PREFIX, docs)
    with torch.inference_mode():
        measured = measure_points(model, artifacts, map_docs, VALIDATION_PREFIX, metric=fidelity_metric(run))
    fidelity = fit_fidelity_map(run, measured, continuation_of(map_docs, VALIDATION_PREFIX))
    if fidelity is None:
        raise SystemExit(f"{folder}: the measurements fix no rising line; nothing written")
    seconds = time.perf_counter() - start
    print(
        f"{folder}: log KL = {fidelity.intercept:.3f} + {fidelity.slope:.3f} log D over {fidelity.samples} "
        f"(document, point) pairs, residual RMS {fidelity.residual:.3f} ({seconds:.0f} s)"
    )
    artifacts.config = replace(artifacts.config, fidelity=fidelity)
    artifacts.card = model_card(artifacts)
    artifacts.save_pretrained(folder)
    again = SCDArtifacts.from_pretrained(folder)
    assert again.artifacts_id == artifacts.artifacts_id and again.config.fidelity == fidelity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--docs", type=int, default=8, help="held-out documents the map is fitted on")
    args = parser.parse_args()
    for folder in args.folders:
        add_map(folder, args.docs)


if __name__ == "__main__":
    main()
