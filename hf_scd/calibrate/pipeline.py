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
from .fidelity import continuation_of, fidelity_metric, fit_fidelity_map
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
    unit_layers: int = 1  # consecutive layers per Reuse unit
    joint_basis: bool = False  # one basis over a unit's heads and layers, else one per head
    default_max_kl: float | None = None
    default_min_ratio: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.is_pair:  # the fidelity map is fitted on the validation measurements: fail before, not after
            _ = self.map_continuation

    @property
    def map_continuation(self) -> int:
        """The continuation every validation document teacher-forces: what the fidelity map's predictions are for."""
        return continuation_of(self.validation_docs, self.validation_prefix)

    @property
    def is_pair(self) -> bool:
        return self.consumer_name is not None

    @property
    def skip_tokens(self) -> int:
        return self.exact_tokens + self.recomputed_tokens

    @property
    def patching(self) -> bool:
        return max(self.patch_counts) > 0

    @property
    def codec(self) -> CodecConfig:
        codec = CodecConfig(
            max_bits=MAX_BITS,
            token_scale="log2-uint8",
            exact_tokens=self.exact_tokens,
            unit_layers=self.unit_layers,
            joint_basis=self.joint_basis,
        )
        if self.is_pair:
            codec = replace(codec, recomputed_tokens=self.recomputed_tokens, reuse=self.reuse)
        return codec


@dataclass
class Calibration:
    """A `Job` and what the steps have built so far. Metrics and weights are keyed by (layer, kind), moments and
    coders by (unit, kind) for K/V ("k"/"v") and by (layer, "h") for a Patch layer's attention input."""

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

    @property
    def units(self) -> list[tuple[int, ...]]:
        """The member layers of every Reuse unit."""
        return self.job.codec.units(self.handle.shape.num_layers)


Step = Callable[[Calibration], None]


def collect(run: Calibration) -> None:
    """K/V moments (joint [producer; consumer] ones for a pair, with attention inputs when patching) and the
    consumer's query energy."""
    job = run.job
    run.moments, run.queries = collect_kv_moments(
        job.producer, job.calibration_docs, skip_tokens=job.skip_tokens, progress=job.progress,
        consumer=job.consumer if job.is_pair else None, hidden_layers=tuple(run.layers) if job.patching else (),
        units=run.units, blocks=job.codec.blocks(run.handle.shape),
    )  # fmt: skip


def measure_metrics(run: Calibration) -> None:
    """Per layer, the consumer's key metric (its query energy) and value metric (its output projection)."""
    shape = run.handle.shape
    for layer in run.layers:
        run.metrics[(layer, "k")] = key_metric(run.queries[layer].mean())
        o_proj = run.handle.attention(layer).o_proj.weight
        run.metrics[(layer, "v")] = value_metric(o_proj, shape.num_kv_heads, shape.head_dim)


def _consumer_rms(moments: KVMoments, width: int, members: int) -> list[float]:
    """RMS per component of the consumer's vectors, per member layer of a unit: the last `width` of each block of the
    (possibly joint [producer; consumer]) moments, laid out (members, heads, head_dim)."""
    variance = moments.covariance().diagonal(dim1=-2, dim2=-1)[..., -width:]
    return [math.sqrt(float(part.mean())) for part in variance.reshape(members, -1)]


def weigh_layers(run: Calibration) -> None:
    """Each K/V's allocation weight: the consumer's measured sensitivity, or (unweighted, for fast tests) the
    inverse of its metric's trace, so every layer's weighted squared error counts the same."""
    job = run.job
    if not job.weigh_layers:
        run.weights = {key: 1.0 / float(m.diagonal(dim1=-2, dim2=-1).sum()) for key, m in run.metrics.items()}
        return
    _, width = job.codec.blocks(run.handle.shape)
    rms = {}
    for unit, members in enumerate(run.units):
        for kind in KINDS:
            figures = _consumer_rms(run.moments[(unit, kind)], width, len(members))
            rms.update({(layer, kind): figure for layer, figure in zip(members, figures, strict=True)})
    docs = [doc[:SENSITIVITY_TOKENS] for doc in job.validation_docs[:SENSITIVITY_DOCS]]
    run.weights = layer_sensitivity(
        job.consumer, docs, rms, run.metrics, skip_tokens=job.skip_tokens, progress=job.progress
    )


def unit_metric(run: Calibration, members: tuple[int, ...], kind: str) -> torch.Tensor:
    """A unit's metric, its blocks' (blocks, width, width): each member layer's metric scaled by that layer's
    sensitivity, so one basis and one bit budget weigh every layer's error by what it costs the output. Joint: one
    block-diagonal matrix over the unit's layers and heads."""
    parts = [run.weights[(layer, kind)] * run.metrics[(layer, kind)] for layer in members]
    if run.job.joint_basis:
        return torch.block_diag(*[head for part in parts for head in part]).unsqueeze(0)
    return torch.cat(parts)


def fit_reuse_coders(run: Calibration) -> None:
    """Every unit's K and V coder: the model's own principal axes, or a cross-model predictor for a pair."""
    keys = [(unit, kind) for unit in range(len(run.units)) for kind in KINDS]
    for unit, kind in tqdm(keys, desc="fitting Reuse coders", disable=not run.job.progress):
        metric = unit_metric(run, run.units[unit], kind)
        run.bases[(unit, kind)] = fit_layer_basis(
            run.moments[(unit, kind)], metric, cross=run.job.reuse, head_dim=run.handle.shape.head_dim
        )


def plan(run: Calibration) -> None:
    """Water-filled bits per (ratio, Patch set), and every tensor the artifacts store."""
    shape = run.handle.shape
    # K/V errors are weighed in their units' metrics already; a Patch layer's attention input by its weight.
    weights = {key: 1.0 if key[1] in KINDS else run.weights[key] for key in run.bases}
    order = allocation_order(run.bases, weights)
    run.moments = {}  # the largest thing calibration holds; not needed past the fits
    # Same-model artifacts store no `out_mean` (it is the mean) and no `decoder` (the encoder's inverse), and their
    # encoders in float16: the decoder inverts the stored encoder exactly, so that rounding costs nothing but a
    # slightly less optimal basis.
    # A pair's joint units store their coders factored (`TensorKeys.FACTORED_FIELDS`).
    if not run.job.reuse:
        fields = ("mean", "encoder", "steps")
    else:
        fields = TensorKeys.FACTORED_FIELDS if run.job.joint_basis else TensorKeys.REUSE_FIELDS
    run.tensors = stack_bases(run.bases, len(run.units), fields)
    if not run.job.reuse:
        run.tensors["encoder"] = half_if_exact(run.tensors["encoder"])
    run.tensors.update(run.patch_tensors)
    blocks, _, components = run.bases[(0, KINDS[0])].encoder.shape
    run.points, bits = plan_points(
        order, shape, run.units, (blocks, components), run.job.ratios, run.patch_sets, run.candidates, run.hidden_width
    )
    run.tensors.update(bits)
    if run.job.reuse:
        drop_unused_components(run.tensors, [TensorKeys.bits(point.name) for point in run.points])


def drop_unused_components(tensors: dict[str, torch.Tensor], bit_keys: list[str]) -> None:
    """Cut a pair's Reuse coders after the last component any point gives a bit: the rest are never coded. (A
    model's own coders stay square, since their decoder is derived as the encoder's inverse.)"""
    used = torch.stack([tensors[key] for key in bit_keys]).flatten(0, -2).amax(0)
    width = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    for key in bit_keys:
        tensors[key] = tensors[key][..., :width]
    for name, axis in (("encoder", -1), ("decoder", -2), ("basis", -1), ("spread", -1)):
        if name in tensors:
            tensors[name] = tensors[name].narrow(axis, 0, width)


def half_if_exact(encoder: torch.Tensor) -> torch.Tensor:
    """float16 where every column keeps its norm to 2^-10 in it (nothing overflows, and the rounding of what falls
    below float16's normal range stays below that), else float32."""
    half = encoder.half()
    error = (half.float() - encoder).norm(dim=-2) / encoder.norm(dim=-2).clamp(min=1e-30)
    return half if bool(half.isfinite().all()) and float(error.max()) <= 2**-10 else encoder


def config(run: Calibration) -> ArtifactsConfig:
    """The artifacts' config (before `SCDArtifacts.build` stamps the format version and tensor hash)."""
    job, shape = run.job, run.handle.shape
    calibration = {
        "documents": len(job.calibration_docs),
        "tokens": sum(map(len, job.calibration_docs)),
        "data": job.data_description,
        "validation_documents": len(job.validation_docs),
    } | ({"layers": run.report} if run.report is not None else {})
    return ArtifactsConfig(
        model=model_entry(job.model_name, job.base_model, shape, job.producer),
        consumer=model_entry(job.consumer_name, job.base_model, shape, job.consumer) if job.is_pair else None,
        codec=job.codec,
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
        fidelity = fit_fidelity_map(run, measured, job.map_continuation)
        settings = replace(settings, fit_probe=probe, fidelity=fidelity)
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
