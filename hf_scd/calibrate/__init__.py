"""Offline calibration: from a model and text to `SCDArtifacts` (bases, steps, bit-allocation plan)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..arch import ModelHandle
from ..artifacts import SCDArtifacts
from ..codes import MAX_BITS
from .card import model_card
from .collect import collect_kv_moments
from .fit import allocation_order, fit_layer_basis, key_metric, value_metric
from .pair import calibrate_pair
from .plan import default_point, model_entry, plan_points, stack_bases, validate_points
from .sensitivity import layer_sensitivity

__all__ = ["calibrate", "calibrate_pair", "validate_points"]

DEFAULT_RATIOS = (2.5, 3, 4, 5, 6, 8, 10, 12)
# The default point is the most compressed one whose validation KL stays within this bound.
DEFAULT_POINT_MAX_KL = 0.005
# Leading real tokens of each row that ship exactly: the attention sink. On SmolLM2-135M keeping one exact token cut
# the 4x point's KL 3.5x; more tokens barely helped.
EXACT_TOKENS = 1


def calibrate(
    model: torch.nn.Module,
    calibration_docs: list[list[int]],
    validation_docs: list[list[int]],
    *,
    model_name: str,
    base_model: str | None = None,
    data_description: str = "",
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    validation_prefix: int = 384,
    weigh_layers: bool = True,
    exact_tokens: int = EXACT_TOKENS,
    progress: bool = True,
) -> SCDArtifacts:
    """Fit bases and quantizers on `calibration_docs`, plan one bit allocation per target ratio, and measure each
    point's KL and top-1 agreement on `validation_docs` (prefix shipped, the rest teacher-forced).

    `weigh_layers` measures each layer's sensitivity so bits go where errors cost most; without it every layer's
    squared error counts the same (faster, for tests).
    """
    handle = ModelHandle(model)
    shape = handle.shape
    moments, queries = collect_kv_moments(model, calibration_docs, skip_tokens=exact_tokens, progress=progress)
    metrics = {}
    for layer in range(shape.num_layers):
        metrics[(layer, "k")] = key_metric(queries[layer].mean())
        o_proj = handle.attention(layer).o_proj.weight
        metrics[(layer, "v")] = value_metric(o_proj, shape.num_kv_heads, shape.head_dim)
    bases = {
        key: fit_layer_basis(m, metrics[key])
        for key, m in tqdm(moments.items(), desc="fitting bases", disable=not progress)
    }
    rms = {
        key: math.sqrt(float(m.covariance().diagonal(dim1=-2, dim2=-1).sum()) / (shape.num_kv_heads * shape.head_dim))
        for key, m in moments.items()
    }
    weights = (
        layer_sensitivity(
            model,
            [doc[:256] for doc in validation_docs[:2]],
            rms,
            metrics,
            skip_tokens=exact_tokens,
            progress=progress,
        )
        if weigh_layers
        else {key: 1.0 / float(metric.diagonal(dim1=-2, dim2=-1).sum()) for key, metric in metrics.items()}
    )
    order = allocation_order(bases, weights)
    tensors = stack_bases(bases, shape.num_layers, ("mean", "encoder", "decoder", "steps"))
    points, bits = plan_points(order, shape, ratios, {0: []}, [], 0)
    tensors.update(bits)
    config = {
        "model": model_entry(model_name, base_model, shape, model),
        "codec": {"max_bits": MAX_BITS, "token_scale": "log2-uint8", "exact_tokens": exact_tokens},
        "calibration": {
            "documents": len(calibration_docs),
            "tokens": sum(map(len, calibration_docs)),
            "data": data_description,
            "validation_documents": len(validation_docs),
        },
        "operating_points": points,
        "default_point": points[0]["name"],
    }
    draft = SCDArtifacts.build(config, tensors)
    for point, (kl, top1) in zip(
        points, validate_points(model, draft, validation_docs, validation_prefix, progress), strict=False
    ):
        point["val_kl"], point["val_top1"] = kl, top1
    config["default_point"] = default_point(points, DEFAULT_POINT_MAX_KL, None)
    final = SCDArtifacts.build(config, tensors)
    final.card = model_card(final)
    return final
