"""Fit the transform coders: bases from K/V moments, quantizer steps and distortion curves from a token sample,
and bit allocations by greedy reverse water-filling over every (layer, K/V, head, component)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..codec import MAX_BITS
from .collect import KVMoments

COARSE_STEPS = torch.exp2(torch.linspace(-7, 2, 37))


@dataclass
class LayerBasis:
    """The allocation-independent part of one layer's K or V coder, plus its measured distortion curves.

    distortion (H, d, MAX_BITS + 1): mean squared error a component adds at each bit width (index 0 = dropped).
    """

    mean: torch.Tensor
    basis: torch.Tensor
    scale: torch.Tensor
    steps: torch.Tensor
    distortion: torch.Tensor


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


def fit_layer_basis(moments: KVMoments, max_sample: int = 8192, step_sample: int = 2048) -> LayerBasis:
    """Principal axes per head, then the best step per bit width and the error each component has at it."""
    eigvals, eigvecs = torch.linalg.eigh(moments.covariance())
    order = torch.argsort(eigvals, dim=-1, descending=True)
    eigvals = torch.gather(eigvals, -1, order).clamp(min=1e-12)
    basis = torch.gather(eigvecs, -1, order.unsqueeze(1).expand_as(eigvecs)).float()
    mean = moments.mean().float()
    scale = eigvals.sqrt().float()

    sample = moments.samples()
    # An evenly spread subset, so the first `step_sample` rows used for the step search are spread too.
    sample = sample[torch.randperm(sample.shape[0], generator=torch.Generator().manual_seed(0))[:max_sample]]
    z = torch.einsum("nhd,hdc->nhc", sample - mean, basis)
    unit = z / scale
    rms = unit.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
    steps = torch.zeros(MAX_BITS + 1)
    distortion = torch.zeros(*scale.shape, MAX_BITS + 1)
    distortion[..., 0] = z.pow(2).mean(0)
    for bits in range(1, MAX_BITS + 1):
        steps[bits] = _best_step(unit[:step_sample], rms[:step_sample], bits)
        recon = _quantize_dequantize(unit, rms, float(steps[bits]), bits) * scale
        distortion[..., bits] = (z - recon).pow(2).mean(0)
    return LayerBasis(mean=mean, basis=basis, scale=scale, steps=steps, distortion=distortion)


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
    order: list[tuple[int, str, int, int]], budget_bits: int, shapes: dict[tuple[int, str], tuple[int, int]]
) -> dict[tuple[int, str], torch.Tensor]:
    """Bit allocation (H, d) per (layer, kind) after the first `budget_bits` increments of `order`."""
    bits = {key: torch.zeros(shape, dtype=torch.uint8) for key, shape in shapes.items()}
    for layer, kind, head, comp in order[:budget_bits]:
        bits[(layer, kind)][head, comp] += 1
    return bits
