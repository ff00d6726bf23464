"""Cross-variant calibration: artifacts that ship a producer's cache to a fine-tuned variant (the consumer).

Reuse layers code the producer's de-rotated keys and values with an encoder fitted on joint calibration activations
and a decoder that predicts the *consumer's* (see `fit._projection`). Patch layers ship a code of the producer's
normalised attention input instead; its decoder predicts the consumer's input, an `Aligner` MLP corrects it, and the
consumer recomputes K/V with its own projections. Which layers are Patch and how many bits every component gets are
planned offline: candidate Patch layers are ranked by the error they remove per layer, bits are water-filled over
all components, and every (budget, number of Patch layers) is validated by KL against the consumer's own prefill.
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ModelHandle
from ..artifacts import SCDArtifacts
from ..patch import Aligner
from ..schema import KINDS, TensorKeys
from .collect import KVMoments
from .fit import LayerBasis, _sqrt_and_inverse, fit_layer_basis
from .pipeline import Calibration, Job, Step, run_pipeline, unit_metric

REUSE_METHODS = ("rrr", "joint-svd")
ALIGNER_LOSSES = ("l2", "kv")
ALIGNER_HELD_OUT = 0.1
DEFAULT_PATCH_COUNTS = (0, 2, 4, 6)
RECOMPUTED_TOKENS = 1


def hidden_metric(
    attention: nn.Module, metrics: tuple[torch.Tensor, torch.Tensor], weights: tuple[float, float]
) -> torch.Tensor:
    """(D, D) metric on the consumer's normalised attention input: the weighted K/V error its `k_proj`/`v_proj`
    turn an input error into. RoPE rotates within the key metric's isotropic planes, so it drops out."""
    total = 0
    for proj, metric, weight in zip((attention.k_proj, attention.v_proj), metrics, weights, strict=True):
        heads, dim = metric.shape[:2]
        w = proj.weight.detach().float().cpu().reshape(heads, dim, -1)
        total = total + weight * torch.einsum("hdi,hde,hej->ij", w, metric.float(), w)
    return total.unsqueeze(0)


def fit_aligner(
    basis: LayerBasis,
    train: torch.Tensor,
    held_out: torch.Tensor,
    metric: torch.Tensor,
    loss: str,
    steps: int = 400,
    width: int = 256,
) -> tuple[Aligner | None, float]:
    """Train an `Aligner` on joint [producer; consumer] rows `train` (N, 1, 2D); its weighted K/V error per token on
    `held_out`, rows neither it nor `basis` was fitted on. None (keep the bare linear prediction) when the MLP does
    not beat it there.

    `loss` "l2" fits the consumer's normalised input itself; "kv" weighs the error by `metric`, i.e. fits the K/V
    the consumer computes from it.
    """
    dim = train.shape[-1] // 2

    def linear_and_target(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = (rows[:, 0, :dim] - basis.mean[0]) @ basis.encoder[0]
        return unit @ basis.decoder[0] + basis.out_mean[0], rows[:, 0, dim:]

    linear, target = linear_and_target(train)
    held_linear, held_target = linear_and_target(held_out)
    sqrt = _sqrt_and_inverse(metric)[0][0].float()
    generator = torch.Generator().manual_seed(0)
    w_in = nn.Parameter(torch.randn(dim, width, generator=generator) / math.sqrt(dim))
    b_in = nn.Parameter(torch.zeros(width))
    w_out = nn.Parameter(torch.zeros(width, dim))
    b_out = nn.Parameter(torch.zeros(dim))
    aligner = Aligner(w_in, b_in, w_out, b_out)
    optimizer = torch.optim.AdamW([w_in, b_in, w_out, b_out], lr=1e-3, weight_decay=1e-2)
    scale = target.var(0).sum() if loss == "l2" else (target @ sqrt).var(0).sum()

    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, linear.shape[0], (256,), generator=generator)
            diff = aligner(linear[rows]) - target[rows]
            value = (diff @ sqrt if loss == "kv" else diff).pow(2).sum(-1).mean() / scale
            optimizer.zero_grad()
            value.backward()
            optimizer.step()

    def held_out_error(predicted: torch.Tensor) -> float:
        return float(((predicted - held_target) @ sqrt).pow(2).sum(-1).mean())

    trained = Aligner(*(t.detach().clone() for t in (w_in, b_in, w_out, b_out)))
    error, linear_error = held_out_error(trained(held_linear)), held_out_error(held_linear)
    return (trained, error) if error < linear_error else (None, linear_error)


def _naive_error(moments: KVMoments, metric: torch.Tensor) -> float:
    """Weighted squared error per token of handing the producer's vectors to the consumer as they are."""
    dim = metric.shape[-1]
    cov, mean = moments.covariance(), moments.mean()
    diff_cov = cov[..., :dim, :dim] + cov[..., dim:, dim:] - cov[..., :dim, dim:] - cov[..., dim:, :dim]
    diff_mean = mean[..., dim:] - mean[..., :dim]
    metric = metric.double()
    return float((metric * diff_cov).sum() + torch.einsum("hd,hde,he->", diff_mean, metric, diff_mean))


def rank_patch_layers(run: Calibration) -> None:
    """Per Reuse unit, the weighted error of naive reuse and of Reuse for the config's report; when patching (units
    of one layer), also of a linear Patch coder, and the best `max(patch_counts)` layers by the error Patch removes
    over Reuse."""
    run.report = []
    for unit, members in enumerate(tqdm(run.units, desc="ranking Patch layers" if run.job.patching else "naive error",
                                        disable=not run.job.progress)):  # fmt: skip
        keys = [(unit, kind) for kind in KINDS]
        reuse_error = sum(run.bases[key].residual for key in keys)  # weighed in the units' metrics already
        naive = sum(_naive_error(run.moments[(unit, kind)], unit_metric(run, members, kind)) for kind in KINDS)
        run.report.append({"layers": list(members), "naive": naive, "reuse": reuse_error})
        if run.job.patching:
            run.report[unit]["patch_linear"] = _linear_patch_error(run, unit)
    if not run.job.patching:
        return
    # Patch candidates, best first: the layers where Patch removes the most error over Reuse.
    gain = sorted(run.layers, key=lambda layer: run.report[layer]["patch_linear"] - run.report[layer]["reuse"])
    by_gain = gain[: max(run.job.patch_counts)]
    run.candidates = sorted(by_gain)
    run.patch_sets = {count: sorted(by_gain[:count]) for count in run.job.patch_counts}
    # Components beyond the K/V width carry no weight in the hidden metric: keep the code no wider than that.
    shape = run.handle.shape
    run.hidden_width = min(run.moments[(run.candidates[0], "h")].dim // 2, 2 * shape.num_kv_heads * shape.head_dim)


def _linear_patch_error(run: Calibration, layer: int) -> float:
    """Weighted K/V error per token of a linear Patch coder on `layer`; keeps the layer's hidden metric (in a
    unit-mean scale) and its scale, the layer's allocation weight."""
    keys = [(layer, kind) for kind in KINDS]
    metric = hidden_metric(
        run.handle.attention(layer), tuple(run.metrics[key] for key in keys), tuple(run.weights[key] for key in keys)
    )
    # Fit in a unit-mean metric (sensitivity-weighted errors are tiny: float32 would go denormal and crawl); the
    # scale comes back as the layer's allocation weight.
    scale = float(metric.diagonal(dim1=-2, dim2=-1).mean())
    run.hidden_metrics[layer], run.weights[(layer, "h")] = metric / scale, scale
    return fit_layer_basis(run.moments[(layer, "h")], run.hidden_metrics[layer], cross="rrr").residual * scale


def fit_patch_coders(run: Calibration) -> None:
    """A coder of the attention input and an aligner for each Patch candidate, and their tensors."""
    for layer in tqdm(run.candidates, desc="fitting Patch coders", disable=not run.job.progress):
        basis, aligner = _fit_patch(run, layer)
        run.bases[(layer, "h")] = basis
        if aligner is not None:  # stored only where the MLP beat the linear prediction
            tensors = {TensorKeys.aligner(layer, f.name): getattr(aligner, f.name) for f in fields(aligner)}
            run.patch_tensors.update(tensors)
    if run.candidates:
        patch = {TensorKeys.PATCH_LAYERS: torch.tensor(run.candidates, dtype=torch.int64)}
        for name in TensorKeys.REUSE_FIELDS:
            stacked = torch.stack([getattr(run.bases[(layer, "h")], name) for layer in run.candidates])
            patch[TensorKeys.patch(name)] = stacked
        run.patch_tensors = patch | run.patch_tensors


def _fit_patch(run: Calibration, layer: int) -> tuple[LayerBasis, Aligner | None]:
    """The layer's Patch coder (no wider than `hidden_width`) and its best aligner, both refitted without held-out
    rows so the aligner and the linear prediction are compared on unseen tokens."""
    kept, held_out = run.moments[(layer, "h")].hold_out(ALIGNER_HELD_OUT)
    basis = fit_layer_basis(kept, run.hidden_metrics[layer], cross="rrr")
    width = run.hidden_width
    basis = LayerBasis(
        basis.mean, basis.out_mean, basis.encoder[..., :width], basis.decoder[:, :width], basis.steps,
        basis.distortion[:, :width], basis.residual,
    )  # fmt: skip
    metric = run.hidden_metrics[layer]
    trained = {loss: fit_aligner(basis, kept.samples(), held_out, metric, loss) for loss in ALIGNER_LOSSES}
    best = min(ALIGNER_LOSSES, key=lambda loss: trained[loss][1])
    scale = run.weights[(layer, "h")]
    errors = {f"patch_{loss}": trained[loss][1] * scale for loss in ALIGNER_LOSSES}
    run.report[layer].update(errors, aligner_loss=best if trained[best][0] is not None else None)
    return basis, trained[best][0]


PAIR_STEPS: tuple[Step, ...] = (rank_patch_layers, fit_patch_coders)


def calibrate_pair(
    producer: nn.Module,
    consumer: nn.Module,
    calibration_docs: list[list[int]],
    validation_docs: list[list[int]],
    *,
    producer_name: str,
    consumer_name: str,
    base_model: str | None = None,
    data_description: str = "",
    ratios: tuple[float, ...] = (3, 4, 6, 8),
    patch_counts: tuple[int, ...] = DEFAULT_PATCH_COUNTS,
    reuse: str = "rrr",
    target_kl: float | None = None,
    target_ratio: float | None = None,
    validation_prefix: int = 384,
    unit_layers: int = 1,
    progress: bool = True,
) -> SCDArtifacts:
    """Fit Reuse coders for every unit and Patch coders + aligners for the best `max(patch_counts)` layers, then
    validate every (ratio, number of Patch layers) point. The default point is the smallest one with validation KL
    <= `target_kl`, or the most faithful one at least `target_ratio` x below BF16 (neither: the most faithful).

    `unit_layers` 1 fits a coder per layer and KV head; more predicts each KV head from its own producer head and
    codes the predictions of a run of that many layers jointly, over all their heads (as same-model units code their
    vectors); a Patch layer is a unit of its own, so then `patch_counts` must be (0,)."""
    if reuse not in REUSE_METHODS:
        raise ValueError(f"reuse must be one of {REUSE_METHODS}, got {reuse!r}")
    shape = ModelHandle(consumer).shape
    if ModelHandle(producer).shape != shape:
        raise ValueError(f"producer {ModelHandle(producer).shape} and consumer {shape} do not share a KV layout")
    if unit_layers < 1 or shape.num_layers % unit_layers:
        raise ValueError(f"unit_layers must divide the {shape.num_layers} layers, got {unit_layers}")
    if unit_layers > 1 and max(patch_counts) > 0:
        raise ValueError("Patch layers need units of one layer: pass patch_counts=(0,) with unit_layers > 1")
    if unit_layers > 1 and reuse != "rrr":
        raise ValueError(f"units of several layers code per-head predictions (reuse='rrr'), not {reuse!r}")
    job = Job(
        producer,
        consumer,
        calibration_docs,
        validation_docs,
        model_name=producer_name,
        ratios=ratios,
        consumer_name=consumer_name,
        base_model=base_model,
        data_description=data_description,
        recomputed_tokens=RECOMPUTED_TOKENS,
        reuse=reuse,
        patch_counts=patch_counts,
        validation_prefix=validation_prefix,
        unit_layers=unit_layers,
        joint_basis=unit_layers > 1,
        default_max_kl=target_kl,
        default_min_ratio=target_ratio,
        progress=progress,
    )
    return run_pipeline(job, PAIR_STEPS)
