"""The plan: operating points (a bit allocation per byte budget, and which layers are Patch) and their validation.

Shared by same-model and cross-variant calibration. Every point is measured, not predicted: KL and top-1 agreement
of the consumer continuing from the shipped cache against the consumer's own prefill, on held-out text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..arch import ModelHandle, ModelShape, model_fingerprint
from ..artifacts import SCDArtifacts
from ..codes import BitLayout
from ..compat import with_cache
from ..eval.metrics import next_token_kl, top1_agreement
from ..fidelity import TAIL_TOKENS, DistortionMetric, TailProbe
from ..schema import KINDS, ModelEntry, OperatingPoint, TensorKeys
from .fit import LayerBasis, allocate_bits


def stack_bases(bases: dict[tuple[int, str], LayerBasis], num_units: int, fields: tuple[str, ...]) -> dict:
    """The K/V coders' tensors, each stacked over (unit, K/V): fields of `LayerBasis` or of its factors."""

    def tensor(basis: LayerBasis, field: str) -> torch.Tensor:
        return basis.factors[field] if basis.factors and field in basis.factors else getattr(basis, field)

    return {
        field: torch.stack(
            [torch.stack([tensor(bases[(unit, kind)], field) for kind in KINDS]) for unit in range(num_units)]
        )
        for field in fields
    }


def plan_points(
    order: list[tuple[int, str, int, int]],
    shape: ModelShape,
    units: list[tuple[int, ...]],
    coder_shape: tuple[int, int],
    ratios: tuple[float, ...],
    patch_sets: dict[int, list[int]],
    candidates: list[int],
    hidden_width: int,
) -> tuple[list[OperatingPoint], dict[str, torch.Tensor]]:
    """One point per (ratio, Patch set): water-filled bits within the budget, as config entries and bit tensors.

    `coder_shape` is (blocks, components) of every unit's K/V coders. `order` covers K/V components of every unit
    ("k", "v", keyed by unit) and hidden components of the Patch `candidates` ("h", keyed by layer); a point takes the
    K/V increments of its Reuse units and the hidden ones of its Patch layers (units of one layer). Points are named
    by ratio ("4x"), with "+p<count>" when they patch layers.
    """
    points, tensors = [], {}
    blocks, components = coder_shape
    for count, patch in sorted(patch_sets.items()):
        reuse = [unit for unit, members in enumerate(units) if not set(members) & set(patch)]
        steps = [step for step in order if step[0] in (patch if step[1] == "h" else reuse)]
        shapes = {(unit, kind): (blocks, components) for unit in reuse for kind in KINDS}
        shapes.update({(layer, "h"): (1, hidden_width) for layer in patch})
        scale_bytes = len(KINDS) * blocks * len(reuse) + len(patch)
        for ratio in ratios:
            budget = math.floor(shape.bf16_bytes_per_token() / ratio) - scale_bytes
            bits = allocate_bits(steps, budget, shapes)
            name = f"{ratio:g}x" + (f"+p{count}" if count else "")
            kv_bits = torch.zeros(len(units), len(KINDS), blocks, components, dtype=torch.uint8)
            for (unit, kind), value in bits.items():
                if kind in KINDS:
                    kv_bits[unit, KINDS.index(kind)] = value
            tensors[TensorKeys.bits(name)] = kv_bits
            if candidates:
                hidden_bits = torch.zeros(len(candidates), 1, hidden_width, dtype=torch.uint8)
                for layer in patch:
                    hidden_bits[candidates.index(layer)] = bits[(layer, "h")]
                tensors[TensorKeys.hidden_bits(name)] = hidden_bits
            per_token = sum(BitLayout(b).bytes_per_token for b in bits.values()) + scale_bytes
            points.append(
                OperatingPoint(
                    name=name,
                    bytes_per_token=float(per_token),
                    ratio_vs_bf16=shape.bf16_bytes_per_token() / per_token,
                    val_kl=float("nan"),
                    val_top1=float("nan"),
                    patch_layers=tuple(patch),
                )
            )
    return points, tensors


def default_point(points: list[OperatingPoint], max_kl: float | None, min_ratio: float | None) -> str:
    """The smallest point with validation KL <= `max_kl`, or the most faithful at least `min_ratio` x below BF16;
    the most faithful point when nothing qualifies."""
    if max_kl is not None:
        within = [p for p in points if p.val_kl <= max_kl]
        if within:
            return max(within, key=lambda p: p.ratio_vs_bf16).name
    if min_ratio is not None:
        within = [p for p in points if p.ratio_vs_bf16 >= min_ratio]
        if within:
            return min(within, key=lambda p: p.val_kl).name
    return min(points, key=lambda p: p.val_kl).name


def model_entry(name: str, base_model: str | None, shape: ModelShape, model: torch.nn.Module) -> ModelEntry:
    """How artifacts name a model they were fitted on: the weights' fingerprint is what gets checked."""
    return ModelEntry(name=name, base_model=base_model, shape=shape, fingerprint=model_fingerprint(model))


@dataclass(frozen=True)
class Measurement:
    """One operating point on one document: KL and top-1 agreement against the oracle and, when a metric was
    given, what a fidelity check would have measured: the weighted distortion of the shipped cache and the KL of the
    tail probe."""

    kl: float
    top1: float
    distortion: float | None = None
    tail_kl: float | None = None


@torch.inference_mode()
def measure_points(
    model: torch.nn.Module,
    artifacts: SCDArtifacts,
    docs: list[list[int]],
    prefix_len: int,
    progress: bool = True,
    producer: torch.nn.Module | None = None,
    metric: DistortionMetric | None = None,
    tail_tokens: int = TAIL_TOKENS,
) -> dict[str, list[Measurement]]:
    """Every operating point on every document: the producer (default: `model` itself) ships `prefix_len` tokens,
    `model` teacher-forces the rest; the oracle is `model` prefilling everything. With a `metric`, also the
    distortion of the rebuilt cache against the shipped one and the KL of the shipped prefix's last `tail_tokens`
    over it (`TailProbe`)."""
    from ..cache import SCDCache

    producer = model if producer is None else producer
    device = next(model.parameters()).device
    results: dict[str, list[Measurement]] = {p.name: [] for p in artifacts.points}
    for doc in tqdm(docs, desc="validating points", disable=not progress):
        ids = torch.tensor([doc], device=device)
        oracle = model(ids).logits[:, prefix_len:-1]
        shipped = SCDCache(artifacts, producer)
        producer(ids[:, :prefix_len], **with_cache(producer, shipped), logits_to_keep=1)
        exact = [(layer.keys, layer.values) for layer in shipped.layers]
        probe = TailProbe(ModelHandle(producer), exact, shipped.record, tail_tokens) if metric is not None else None
        for point in artifacts.points:
            consumer = SCDCache.from_payload(shipped.encode(point.name), artifacts, model)
            distortion = tail_kl = None
            if metric is not None:
                rebuilt = [(layer.keys, layer.values) for layer in consumer.layers]
                distortion = float(metric.distortion(exact, rebuilt, shipped.record.attention_mask).max())
                tail_kl = probe.kl(rebuilt) if probe.usable else None
            logits = model(ids[:, prefix_len:], **with_cache(model, consumer)).logits[:, :-1]
            kl, top1 = next_token_kl(oracle, logits), top1_agreement(oracle, logits)
            results[point.name].append(Measurement(kl, top1, distortion, tail_kl))
    return results


def mean_fidelity(measured: dict[str, list[Measurement]]) -> list[tuple[float, float]]:
    """(mean KL, mean top-1 agreement) of every point, in the order measured."""
    return [(sum(m.kl for m in runs) / len(runs), sum(m.top1 for m in runs) / len(runs)) for runs in measured.values()]


def validate_points(
    model: torch.nn.Module,
    artifacts: SCDArtifacts,
    docs: list[list[int]],
    prefix_len: int,
    progress: bool = True,
    producer: torch.nn.Module | None = None,
) -> list[tuple[float, float]]:
    """(KL vs oracle, top-1 agreement) of every operating point, averaged over `docs` (see `measure_points`)."""
    return mean_fidelity(measure_points(model, artifacts, docs, prefix_len, progress, producer))
