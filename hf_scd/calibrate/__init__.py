"""Offline calibration: from a model and text to `SCDArtifacts` (bases, steps, bit-allocation plan)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..arch import ModelHandle, model_fingerprint
from ..artifacts import KINDS, SCDArtifacts
from ..codec import MAX_BITS, BitLayout
from ..eval.metrics import next_token_kl, top1_agreement
from .card import model_card
from .collect import collect_kv_moments
from .fit import allocate_bits, allocation_order, fit_layer_basis, key_metric, value_metric
from .sensitivity import layer_sensitivity

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

    tensors: dict[str, torch.Tensor] = {
        field: torch.stack(
            [torch.stack([getattr(bases[(layer, kind)], field) for kind in KINDS]) for layer in range(shape.num_layers)]
        )
        for field in ("mean", "encoder", "decoder", "steps")
    }
    shapes = {key: (shape.num_kv_heads, shape.head_dim) for key in bases}
    scale_bytes = shape.num_kv_heads * len(KINDS) * shape.num_layers
    points = []
    for ratio in ratios:
        budget_bytes = math.floor(shape.bf16_bytes_per_token() / ratio) - scale_bytes
        bits = allocate_bits(order, budget_bytes, shapes)
        stacked = torch.stack(
            [torch.stack([bits[(layer, kind)] for kind in KINDS]) for layer in range(shape.num_layers)]
        )
        name = f"{ratio:g}x"
        tensors[f"points.{name}.bits"] = stacked
        per_token = sum(BitLayout(b).bytes_per_token for b in bits.values()) + scale_bytes
        points.append(
            {
                "name": name,
                "bytes_per_token": float(per_token),
                "ratio_vs_bf16": shape.bf16_bytes_per_token() / per_token,
                "val_kl": float("nan"),
                "val_top1": float("nan"),
            }
        )

    config = {
        "model": {
            "name": model_name,
            "base_model": base_model,
            "shape": shape.to_dict(),
            "fingerprint": model_fingerprint(model),
        },
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
    within = [p for p in points if p["val_kl"] <= DEFAULT_POINT_MAX_KL]
    config["default_point"] = max(within or points[:1], key=lambda p: p["ratio_vs_bf16"])["name"]
    final = SCDArtifacts.build(config, tensors)
    final.card = model_card(final)
    return final


@torch.inference_mode()
def validate_points(
    model: torch.nn.Module, artifacts: SCDArtifacts, docs: list[list[int]], prefix_len: int, progress: bool = True
) -> list[tuple[float, float]]:
    """(KL vs oracle, top-1 agreement) of every operating point: ship `prefix_len` tokens, teacher-force the rest."""
    from ..cache import SCDCache

    device = next(model.parameters()).device
    results = {p.name: [] for p in artifacts.points}
    for doc in tqdm(docs, desc="validating points", disable=not progress):
        ids = torch.tensor([doc], device=device)
        oracle = model(ids).logits[:, prefix_len:-1]
        producer = SCDCache(artifacts, model)
        model(ids[:, :prefix_len], past_key_values=producer, logits_to_keep=1)
        for point in artifacts.points:
            consumer = SCDCache.from_payload(producer.encode(point.name), artifacts, model)
            logits = model(ids[:, prefix_len:], past_key_values=consumer).logits[:, :-1]
            results[point.name].append((next_token_kl(oracle, logits), top1_agreement(oracle, logits)))
    return [tuple(sum(v) / len(v) for v in zip(*results[p.name], strict=False)) for p in artifacts.points]
