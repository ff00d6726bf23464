"""Fit the transform coders: bases from K/V moments in the metric that matters to attention, quantizer steps and
distortion curves from a token sample, and bit allocations by greedy reverse water-filling over every
(layer, K/V, head, component).

The metric: a key error matters through the logits q.dk, so keys are weighted by the energy of the queries that
read them; a value error matters through the output projection, so values are weighted by its Gram matrix. The
basis is the principal axes of the weighted vectors, so bits go to directions that move the model's output.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..codec import MAX_BITS
from .collect import KVMoments

COARSE_STEPS = torch.exp2(torch.linspace(-7, 2, 37))


# Metric regularisation, relative to its mean eigenvalue: keeps every direction weakly weighted, so a direction the
# calibration text never exercised is still coded sensibly.
METRIC_FLOOR = 1e-2


@dataclass
class LayerBasis:
    """The allocation-independent part of one layer's K or V coder, plus its measured distortion curves.

    encoder (H, d, C) / decoder (H, C, d) as in `TransformCode`; distortion (H, C, MAX_BITS + 1): weighted squared
    error a component adds at each bit width (index 0 = dropped).
    """

    mean: torch.Tensor
    encoder: torch.Tensor
    decoder: torch.Tensor
    steps: torch.Tensor
    distortion: torch.Tensor


def key_metric(query_energy: torch.Tensor) -> torch.Tensor:
    """(H, d) mean squared queries -> (H, d, d) diagonal key metric.

    RoPE turns the logit into q^T R(m-n) k with a relative rotation in each (i, i + d/2) plane; averaged over
    offsets, each plane's weight is isotropic, so both dimensions of a pair get their mean query energy.
    """
    half = query_energy.shape[-1] // 2
    paired = (query_energy[..., :half] + query_energy[..., half:]) / 2
    return torch.diag_embed(torch.cat([paired, paired], -1)).float()


def value_metric(o_proj_weight: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """(hidden, q_heads * d) output projection -> (H, d, d): sum of W_h^T W_h over the query heads of each KV head."""
    weight = o_proj_weight.detach().float().cpu().reshape(o_proj_weight.shape[0], kv_heads, -1, head_dim)
    return torch.einsum("okgd,okge->kde", weight, weight)


def _sqrt_and_inverse(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigvals, eigvecs = torch.linalg.eigh(metric.double())
    floor = METRIC_FLOOR * eigvals.mean(-1, keepdim=True)
    root = (eigvals.clamp(min=0) + floor).sqrt()
    sqrt = eigvecs @ torch.diag_embed(root) @ eigvecs.transpose(-1, -2)
    inverse = eigvecs @ torch.diag_embed(1 / root) @ eigvecs.transpose(-1, -2)
    return sqrt, inverse


def _quantize_dequantize(unit: torch.Tensor, rms: torch.Tensor, step: float, bits: int) -> torch.Tensor:
    levels = 2**bits
    scaled_step = step * rms
    codes = torch.clamp(torch.floor(unit / scaled_step) + levels / 2, 0, levels - 1)
    return (codes - levels / 2 + 0.5) * scaled_step


def _best_step(unit: torch.Tensor, rms: torch.Tensor, bits: int) -> float:
    """MSE-optimal step for unit-spread coefficients: a coarse log-grid, then a finer one around its best."""

    def error(step: float) -> float:
        return float((unit - _quantize_dequantize(unit, rms, step, bits)).pow(2).mean())

    best = min(COARSE_STEPS.tolist(), key=error)
    return min((best * 2 ** (k / 32) for k in range(-8, 9)), key=error)


def fit_layer_basis(
    moments: KVMoments, metric: torch.Tensor, max_sample: int = 8192, step_sample: int = 2048
) -> LayerBasis:
    """Principal axes per head in the metric's space, then the best step per bit width and each component's error."""
    sqrt, inverse = _sqrt_and_inverse(metric)
    weighted_cov = sqrt @ moments.covariance() @ sqrt
    eigvals, eigvecs = torch.linalg.eigh(weighted_cov)
    order = torch.argsort(eigvals, dim=-1, descending=True)
    spread = torch.gather(eigvals, -1, order).clamp(min=1e-12).sqrt()
    basis = torch.gather(eigvecs, -1, order.unsqueeze(1).expand_as(eigvecs))
    encoder = (sqrt @ basis / spread.unsqueeze(-2)).float()
    decoder = (spread.unsqueeze(-1) * basis.transpose(-1, -2) @ inverse).float()
    mean = moments.mean().float()

    sample = moments.samples()
    # An evenly spread subset, so the first `step_sample` rows used for the step search are spread too.
    sample = sample[torch.randperm(sample.shape[0], generator=torch.Generator().manual_seed(0))[:max_sample]]
    unit = torch.einsum("nhd,hdc->nhc", sample - mean, encoder)
    spread = spread.float()
    rms = unit.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
    steps = torch.zeros(MAX_BITS + 1)
    distortion = torch.zeros(*spread.shape, MAX_BITS + 1)
    distortion[..., 0] = (unit * spread).pow(2).mean(0)
    for bits in range(1, MAX_BITS + 1):
        steps[bits] = _best_step(unit[:step_sample], rms[:step_sample], bits)
        error = unit - _quantize_dequantize(unit, rms, float(steps[bits]), bits)
        distortion[..., bits] = (error * spread).pow(2).mean(0)
    return LayerBasis(mean=mean, encoder=encoder, decoder=decoder, steps=steps, distortion=distortion)


def allocation_order(
    bases: dict[tuple[int, str], LayerBasis], weights: dict[tuple[int, str], float]
) -> list[tuple[int, str, int, int]]:
    """Every one-bit increment (layer, kind, head, component) in the order greedy water-filling takes them.

    Each step takes the increment with the largest weighted drop in distortion; the first B increments are the
    allocation for a budget of B bits per token. Gains are made non-increasing per component so that order holds.
    """
    heap = []
    gains = {}
    for key, basis in bases.items():
        drops = basis.distortion[..., :-1] - basis.distortion[..., 1:]
        # Running minimum keeps each component's gains non-increasing, so bits are taken in order per component.
        drops = torch.cummin(drops.clamp(min=0), dim=-1).values * weights[key]
        gains[key] = drops
        heads, dims = drops.shape[:2]
        for head in range(heads):
            for comp in range(dims):
                heapq.heappush(heap, (-float(drops[head, comp, 0]), key, head, comp, 0))
    order = []
    while heap:
        _, key, head, comp, bits = heapq.heappop(heap)
        order.append((*key, head, comp))
        if bits + 1 < MAX_BITS:
            heapq.heappush(heap, (-float(gains[key][head, comp, bits + 1]), key, head, comp, bits + 1))
    return order


def allocate_bits(
    order: list[tuple[int, str, int, int]],
    budget_bytes: int,
    shapes: dict[tuple[int, str], tuple[int, int]],
) -> dict[tuple[int, str], torch.Tensor]:
    """Bit allocation (H, d) per (layer, kind) that fits `budget_bytes` of packed codes per token.

    Walks `order`, taking each increment whose head still has room: each head's bits are padded to whole bytes
    (`BitLayout`), so a head's next bit is free until its last byte is full, and costs a new byte after that.
    Once a component is refused it takes no more bits, which keeps each component's bits in order.
    """
    bits = {key: torch.zeros(shape, dtype=torch.int64) for key, shape in shapes.items()}
    head_bits: dict[tuple[int, str, int], int] = {}
    refused: set[tuple[int, str, int, int]] = set()
    used = 0
    for layer, kind, head, comp in order:
        if (layer, kind, head, comp) in refused:
            continue
        held = head_bits.get((layer, kind, head), 0)
        cost = 1 if held % 8 == 0 else 0
        if used + cost > budget_bytes:
            refused.add((layer, kind, head, comp))
            continue
        used += cost
        head_bits[(layer, kind, head)] = held + 1
        bits[(layer, kind)][head, comp] += 1
    return {key: value.to(torch.uint8) for key, value in bits.items()}
