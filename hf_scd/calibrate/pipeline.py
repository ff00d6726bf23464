"""One calibration pipeline for same-model and cross-variant artifacts.

Steps run in order on one `Calibration`, each filling in a part of it: collect activations, the per-layer metrics,
the layer weights, the Reuse coders, [the steps a pair adds: ranking and fitting Patch layers], the plan of
operating points, their validation and (same-model) the fit probe. Same-model calibration is the pipeline with the
producer as its own consumer and no Patch steps; `calibrate_pair` adds its steps (see `pair.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ModelHandle
from ..artifacts import SCDArtifacts
from ..codes import MAX_BITS
from ..fidelity import key_metric, value_metric
from ..probe import measure_fit_probe
from ..schema import KINDS, ArtifactsConfig, CodecConfig, TensorKeys
from .card import model_card
from .collect import KVMoments, QueryEnergy, collect_kv_moments
from .fidelity import fidelity_metric, fit_fidelity_map
from .fit import LayerBasis, allocation_order, fit_layer_basis
from .plan import default_point, mean_fidelity, measure_points, model_entry, plan_points, stack_bases
from .sensitivity import layer_sensitivity

SENSITIVITY_DOCS, SENSITIVITY_TOKENS = 2, 256


@dataclass(frozen=True)
class Job:
    """What to calibrate and how. Same-model: `consumer is producer` and no `consumer_name`.

    The sink (the first `exact_tokens + recomputed_tokens` tokens of each row) is never coded, so calibration
    leaves it out: same-model artifacts ship it exactly, a consumer of another model recomputes it.
    """

    producer: nn.Module
    consumer: nn.Module
    calibration_docs: list[list[int]]
    validation_docs: list[list[int]]
    model_name: str
    ratios: tuple[float, ...]
    consumer_name: str | None = None
    base_model: str | None = None
    data_description: str = ""
    exact_tokens: int = 0
    recomputed_tokens: int = 0
    reuse: str | None = None  # cross-model Reuse coder ("rrr", "joint-svd"); None: the model's own principal axes
    patch_counts: tuple[int, ...] = (0,)
    weigh_layers: bool = True
    validation_prefix: int = 384
    default_max_kl: float | None = None
    default_min_ratio: float | None = None
    progress: bool = True

    @property
    def is_pair(self) -> bool:
        return self.consumer_name is not None

    @property
    def skip_tokens(self) -> int:
        return self.exact_tokens + self.recomputed_tokens

    @property
    def patching(self) -> bool:
        return max(self.patch_counts) > 0


@dataclass
class Calibration:
    """A `Job` and what the steps have built so far. Coders, metrics and weights are keyed by (layer, kind): kind
    "k"/"v" for K/V, "h" for a Patch layer's attention input."""

    job: Job
    handle: ModelHandle  # the consumer's: its metrics, weights and validation are what the plan optimises
    moments: dict[tuple[int, str], KVMoments] = field(default_factory=dict)
    queries: dict[int, QueryEnergy] = field(default_factory=dict)
    metrics: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    weights: dict[tuple[int, str], float] = field(default_factory=dict)
    bases: dict[tuple[int, str], LayerBasis] = field(default_factory=dict)
    # Filled by the pair's steps: per-layer errors for the config, Patch sets per count, the candidates' tensors.
    report: list[dict] | None = None
    hidden_metrics: dict[int, torch.Tensor] = field(default_factory=dict)
    patch_sets: dict[int, list[int]] = field(default_factory=lambda: {0: []})
    candidates: list[int] = field(default_factory=list)
    hidden_width: int = 0
    patch_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # Filled by `plan`.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    points: list[dict] = field(default_factory=list)

    @property
    def layers(self) -> range:
        return range(self.handle.shape.num_layers)


Step = Callable[[Calibration], None]


def collect(run: Calibration) -> None:
    """K/V moments (joint [producer; consumer] ones for a pair, with attention inputs when patching) and the
    consumer's query energy."""
    job = run.job
    run.moments, run.queries = collect_kv_moments(
        job.producer, job.calibration_docs, skip_tokens=job.skip_tokens, progress=job.progress,
        consumer=job.consumer if job.is_pair else None, hidden_layers=tuple(run.layers) if job.patching else (),
    )  # fmt: skip


def measure_metrics(run: Calibration) -> None:
    """Per layer, the consumer's key metric (its query energy) and value metric (its output projection)."""
    shape = run.handle.shape
    for layer in run.layers:
        run.metrics[(layer, "k")] = key_metric(run.queries[layer].mean())
        o_proj = run.handle.attention(layer).o_proj.weight
        run.metrics[(layer, "v")] = value_metric(o_proj, shape.num_kv_heads, shape.head_dim)


def _consumer_rms(moments: KVMoments, dim: int) -> float:
    """RMS per component of the consumer's vectors: the last `dim` of the (possibly joint) moments."""
    return math.sqrt(float(moments.covariance()[..., -dim:, -dim:].diagonal(dim1=-2, dim2=-1).mean()))


def weigh_layers(run: Calibration) -> None:
    """Each K/V's allocation weight: the consumer's measured sensitivity, or (unweighted, for fast tests) the
    inverse of its metric's trace, so every layer's weighted squared error counts the same."""
    job = run.job
    if not job.weigh_layers:
        run.weights = {key: 1.0 / float(m.diagonal(dim1=-2, dim2=-1).sum()) for key, m in run.metrics.items()}
        return
    dim = run.handle.shape.head_dim
    rms = {key: _consumer_rms(m, dim) for key, m in run.moments.items() if key[1] in KINDS}
    docs = [doc[:SENSITIVITY_TOKENS] for doc in job.validation_docs[:SENSITIVITY_DOCS]]
    run.weights = layer_sensitivity(
        job.consumer, docs, rms, run.metrics, skip_tokens=job.skip_tokens, progress=job.progress
    )


def fit_reuse_coders(run: Calibration) -> None:
    """Every layer's K and V coder: the model's own principal axes, or a cross-model predictor for a pair."""
    for key in tqdm(list(run.metrics), desc="fitting Reuse coders", disable=not run.job.progress):
        run.bases[key] = fit_layer_basis(run.moments[key], run.metrics[key], cross=run.job.reuse)


def plan(run: Calibration) -> None:
    """Water-filled bits per (ratio, Patch set), and every tensor the artifacts store."""
    shape = run.handle.shape
    order = allocation_order(run.bases, run.weights)
    run.moments = {}  # the largest thing calibration holds; not needed past the fits
    # Same-model artifacts store no `out_mean`: it is the mean.
    coder_fields = TensorKeys.REUSE_FIELDS
    fields = coder_fields if run.job.reuse else tuple(f for f in coder_fields if f != "out_mean")
    run.tensors = stack_bases(run.bases, shape.num_layers, fields)
    run.tensors.update(run.patch_tensors)
    run.points, bits = plan_points(order, shape, run.job.ratios, run.patch_sets, run.candidates, run.hidden_width)
    run.tensors.update(bits)


def config(run: Calibration) -> ArtifactsConfig:
    """The artifacts' config (before `SCDArtifacts.build` stamps the format version and tensor hash)."""
    job, shape = run.job, run.handle.shape
    codec = CodecConfig(max_bits=MAX_BITS, token_scale="log2-uint8", exact_tokens=job.exact_tokens)
    if job.is_pair:
        codec = replace(codec, recomputed_tokens=job.recomputed_tokens, reuse=job.reuse)
    calibration = {
        "documents": len(job.calibration_docs),
        "tokens": sum(map(len, job.calibration_docs)),
        "data": job.data_description,
        "validation_documents": len(job.validation_docs),
    } | ({"layers": run.report} if run.report is not None else {})
    return ArtifactsConfig(
        model=model_entry(job.model_name, job.base_model, shape, job.producer),
        consumer=model_entry(job.consumer_name, job.base_model, shape, job.consumer) if job.is_pair else None,
        codec=codec,
        calibration=calibration,
        operating_points=tuple(run.points),
        default_point=run.points[0].name,
    )


def validate(run: Calibration) -> SCDArtifacts:
    """Measure every point (the consumer continuing from the producer's shipped cache), pick the default point,
    record the fit probe of same-model artifacts at it (the start of the first validation document) and the fidelity
    map fitted on the same measurements, and write the card."""
    job = run.job
    settings = config(run)
    draft = SCDArtifacts.build(settings, run.tensors)
    metric = None if job.is_pair else fidelity_metric(run, next(job.consumer.parameters()).device)
    measured = measure_points(
        job.consumer, draft, job.validation_docs, job.validation_prefix, job.progress, job.producer, metric
    )
    run.points = [
        replace(point, val_kl=kl, val_top1=top1)
        for point, (kl, top1) in zip(run.points, mean_fidelity(measured), strict=True)
    ]
    default = default_point(run.points, job.default_max_kl, job.default_min_ratio)
    settings = replace(settings, operating_points=tuple(run.points), default_point=default)
    if not job.is_pair:  # what the codes of the default point do to the model's own K/V, for `identify` to compare
        probe = measure_fit_probe(draft, job.producer, job.validation_docs[0], default)
        settings = replace(settings, fit_probe=probe, fidelity=fit_fidelity_map(run, measured))
    final = SCDArtifacts.build(settings, run.tensors)
    final.card = model_card(final)
    return final


FITTING_STEPS: tuple[Step, ...] = (collect, measure_metrics, weigh_layers, fit_reuse_coders)


def run_pipeline(job: Job, extra_steps: Sequence[Step] = ()) -> SCDArtifacts:
    """Fit, plan and validate artifacts for `job`; `extra_steps` run after the Reuse coders and before the plan."""
    run = Calibration(job, ModelHandle(job.consumer))
    for step in (*FITTING_STEPS, *extra_steps, plan):
        step(run)
    return validate(run)
