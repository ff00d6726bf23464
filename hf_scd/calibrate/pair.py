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
from ..artifacts import KINDS, SCDArtifacts
from ..codes import MAX_BITS
from ..patch import Aligner
from .card import model_card
from .collect import KVMoments, collect_kv_moments
from .fit import LayerBasis, _sqrt_and_inverse, allocation_order, fit_layer_basis, key_metric, value_metric
from .plan import default_point, model_entry, plan_points, stack_bases, validate_points
from .sensitivity import layer_sensitivity

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
    progress: bool = True,
) -> SCDArtifacts:
    """Fit Reuse coders for every layer and Patch coders + aligners for the best `max(patch_counts)` layers, then
    validate every (ratio, number of Patch layers) point. The default point is the smallest one with validation KL
    <= `target_kl`, or the most faithful one at least `target_ratio` x below BF16 (neither: the most faithful)."""
    if reuse not in REUSE_METHODS:
        raise ValueError(f"reuse must be one of {REUSE_METHODS}, got {reuse!r}")
    handle = ModelHandle(consumer)
    shape = handle.shape
    if ModelHandle(producer).shape != shape:
        raise ValueError(f"producer {ModelHandle(producer).shape} and consumer {shape} do not share a KV layout")
    layers = tuple(range(shape.num_layers))
    patching = max(patch_counts) > 0  # a Reuse-only plan needs no attention inputs
    moments, queries = collect_kv_moments(
        producer, calibration_docs, skip_tokens=RECOMPUTED_TOKENS, progress=progress, consumer=consumer,
        hidden_layers=layers if patching else (),
    )  # fmt: skip
    metrics = {}
    for layer in layers:
        metrics[(layer, "k")] = key_metric(queries[layer].mean())
        metrics[(layer, "v")] = value_metric(handle.attention(layer).o_proj.weight, shape.num_kv_heads, shape.head_dim)
    rms = {
        key: math.sqrt(float(m.covariance()[..., m.dim // 2 :, m.dim // 2 :].diagonal(dim1=-2, dim2=-1).mean()))
        for key, m in moments.items()
        if key[1] in KINDS
    }
    docs = [doc[:256] for doc in validation_docs[:2]]
    weights = layer_sensitivity(consumer, docs, rms, metrics, skip_tokens=RECOMPUTED_TOKENS, progress=progress)
    bases = {
        key: fit_layer_basis(moments[key], metrics[key], cross=reuse)
        for key in tqdm(list(metrics), desc="fitting Reuse coders", disable=not progress)
    }
    report, hidden_metrics, hidden_scales = [], {}, {}
    for layer in tqdm(layers, desc="ranking Patch layers" if patching else "naive error", disable=not progress):
        reuse_error = sum(bases[(layer, kind)].residual * weights[(layer, kind)] for kind in KINDS)
        naive = sum(
            _naive_error(moments[(layer, kind)], metrics[(layer, kind)]) * weights[(layer, kind)] for kind in KINDS
        )
        report.append({"layer": layer, "naive": naive, "reuse": reuse_error})
        if not patching:
            continue
        metric = hidden_metric(
            handle.attention(layer),
            (metrics[(layer, "k")], metrics[(layer, "v")]),
            (weights[(layer, "k")], weights[(layer, "v")]),
        )
        # Fit in a unit-mean metric (sensitivity-weighted errors are tiny: float32 would go denormal and crawl);
        # the scale comes back as the layer's allocation weight.
        hidden_scales[layer] = float(metric.diagonal(dim1=-2, dim2=-1).mean())
        hidden_metrics[layer] = metric / hidden_scales[layer]
        linear = fit_layer_basis(moments[(layer, "h")], hidden_metrics[layer], cross="rrr")
        report[layer]["patch_linear"] = linear.residual * hidden_scales[layer]
    # Patch candidates, best first: the layers where Patch removes the most error over Reuse.
    gain = sorted(layers, key=lambda layer: report[layer]["patch_linear"] - report[layer]["reuse"]) if patching else []
    by_gain = gain[: max(patch_counts)]
    candidates = sorted(by_gain)
    # Components beyond the K/V width carry no weight in the hidden metric: keep the code no wider than that.
    width = min(moments[(candidates[0], "h")].dim // 2, 2 * shape.num_kv_heads * shape.head_dim) if patching else 0
    patches: dict[int, tuple[LayerBasis, Aligner | None]] = {}
    for layer in tqdm(candidates, desc="fitting Patch coders", disable=not progress):
        # Refitted without the held-out rows, so the aligner and the linear prediction are compared on unseen tokens.
        kept, held_out = moments[(layer, "h")].hold_out(ALIGNER_HELD_OUT)
        basis = fit_layer_basis(kept, hidden_metrics[layer], cross="rrr")
        basis = LayerBasis(
            basis.mean, basis.out_mean, basis.encoder[..., :width], basis.decoder[:, :width], basis.steps,
            basis.distortion[:, :width], basis.residual,
        )  # fmt: skip
        trained = {
            loss: fit_aligner(basis, kept.samples(), held_out, hidden_metrics[layer], loss) for loss in ALIGNER_LOSSES
        }
        best = min(ALIGNER_LOSSES, key=lambda loss: trained[loss][1])
        errors = {f"patch_{loss}": trained[loss][1] * hidden_scales[layer] for loss in ALIGNER_LOSSES}
        report[layer].update(errors, aligner_loss=best if trained[best][0] is not None else None)
        patches[layer] = (basis, trained[best][0])
        bases[(layer, "h")] = basis
        weights[(layer, "h")] = hidden_scales[layer]
    del moments

    order = allocation_order(bases, weights)
    tensors = stack_bases(bases, shape.num_layers, ("mean", "out_mean", "encoder", "decoder", "steps"))
    if candidates:
        tensors["patch.layers"] = torch.tensor(candidates, dtype=torch.int64)
        for field in ("mean", "out_mean", "encoder", "decoder", "steps"):
            tensors[f"patch.{field}"] = torch.stack([getattr(patches[layer][0], field) for layer in candidates])
    for layer in candidates:
        if (aligner := patches[layer][1]) is not None:  # stored only where the MLP beat the linear prediction
            tensors.update({f"aligner.{layer}.{f.name}": getattr(aligner, f.name) for f in fields(aligner)})
    patch_sets = {count: sorted(by_gain[:count]) for count in patch_counts}
    points, bits = plan_points(order, shape, ratios, patch_sets, candidates, width)
    tensors.update(bits)
    config = {
        "model": model_entry(producer_name, base_model, shape, producer),
        "consumer": model_entry(consumer_name, base_model, shape, consumer),
        "codec": {
            "max_bits": MAX_BITS,
            "token_scale": "log2-uint8",
            "exact_tokens": 0,
            "recomputed_tokens": RECOMPUTED_TOKENS,
            "reuse": reuse,
        },
        "calibration": {
            "documents": len(calibration_docs),
            "tokens": sum(map(len, calibration_docs)),
            "data": data_description,
            "validation_documents": len(validation_docs),
            "layers": report,
        },
        "operating_points": points,
        "default_point": points[0]["name"],
    }
    draft = SCDArtifacts.build(config, tensors)
    results = validate_points(consumer, draft, validation_docs, validation_prefix, progress, producer=producer)
    for point, (kl, top1) in zip(points, results, strict=True):
        point["val_kl"], point["val_top1"] = kl, top1
    config["default_point"] = default_point(points, target_kl, target_ratio)
    final = SCDArtifacts.build(config, tensors)
    final.card = model_card(final)
    return final
