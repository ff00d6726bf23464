"""Fit the transform coders: bases from K/V moments in the metric that matters to attention, quantizer steps and
distortion curves from a token sample, and bit allocations by greedy reverse water-filling over every
(layer, K/V, head, component).

The metric (`hf_scd.fidelity.key_metric` / `value_metric`, which a producer's fidelity check measures in too): a key
error matters through the logits q.dk, so keys are weighted by the energy of the queries that read them; a value
error matters through the output projection, so values are weighted by its Gram matrix. The basis is the principal
axes of the weighted vectors, so bits go to directions that move the model's output.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .. import linalg
from ..artifacts import factored_coders
from ..codes import MAX_BITS
from .collect import KVMoments

COARSE_STEPS = torch.exp2(torch.linspace(-7, 2, 37))


# Metric regularisation, relative to its mean eigenvalue: keeps every direction weakly weighted, so a direction the
# calibration text never exercised is still coded sensibly.
METRIC_FLOOR = 1e-2
# Ridge of cross-model regressions, relative to the producer's mean variance.
RIDGE = 1e-3


@dataclass
class LayerBasis:
    """The allocation-independent part of one layer's K or V coder, plus its measured distortion curves.

    mean / out_mean / encoder (H, d, C) / decoder (H, C, d) as in `TransformCode`; distortion (H, C, MAX_BITS + 1):
    weighted squared error a component adds at each bit width (index 0 = dropped); residual: weighted squared error
    per token left with every component kept exactly (0 for a model's own vectors, the prediction error for another
    model's).
    """

    mean: torch.Tensor
    out_mean: torch.Tensor
    encoder: torch.Tensor
    decoder: torch.Tensor
    steps: torch.Tensor
    distortion: torch.Tensor
    residual: float
    factors: dict[str, torch.Tensor] | None = None  # a pair's "rrr" coder, as `TensorKeys.FACTORED_FIELDS` store it


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


def _spread_gain(
    encoder: torch.Tensor, decoder: torch.Tensor, cov_in: torch.Tensor, cov_out: torch.Tensor, sqrt: torch.Tensor
) -> torch.Tensor:
    """(H, 1, 1) the factor that scales the decoder per head so its predictions have the consumer's weighted spread.

    A least-squares prediction of another model's vectors is shrunk toward their mean by the part it cannot explain.
    Shrunk keys make every logit smaller and attention flatter, a bias that costs more than the variance the
    shrinkage saves: on the SmolLM2 pair, restoring the spread (gains 1.02 on average, 1.07 at most) took the 4x
    point from KL 0.020 / ΔNLL 0.025 to 0.016 / 0.017 on 8 held-out documents (naive reuse: 0.032 / 0.020).
    """
    mapped = encoder.double() @ decoder.double() @ sqrt
    predicted = torch.einsum("hdi,hde,hei->h", mapped, cov_in, mapped)
    target = (sqrt @ cov_out @ sqrt).diagonal(dim1=-2, dim2=-1).sum(-1)
    return (target / predicted.clamp(min=1e-12)).sqrt()[..., None, None]


def _diagonal_blocks(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """(..., W, W) block-diagonal -> its (..., W / width, width, width) blocks."""
    heads = matrix.shape[-1] // width
    blocks = matrix.unflatten(-1, (heads, width)).unflatten(-3, (heads, width))  # (..., n, d, n, d)
    return torch.diagonal(blocks, dim1=-4, dim2=-2).movedim(-1, -3)


def _ridge(cov_in: torch.Tensor) -> torch.Tensor:
    """The ridge of a regression on vectors of covariance `cov_in`: RIDGE times their mean variance."""
    dim = cov_in.shape[-1]
    return RIDGE * cov_in.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(dim, dtype=cov_in.dtype)


def _predictor(cov_in: torch.Tensor, cross_cov: torch.Tensor, width: int) -> torch.Tensor:
    """Ridge regression of the consumer's vectors on the producer's, block-diagonal: within each run of `width`
    dimensions (one KV head of one layer). A unit coded jointly across heads and layers still predicts head by head:
    one regression over a whole unit (1,024 dimensions on Qwen2.5-Coder-0.5B) overfits the calibration tokens (8,192
    on the shipped pairs; validation KL at 4x rose from 0.039 to 0.051), where a head's is well determined."""
    predictor = torch.zeros_like(cross_cov)
    for start in range(0, cov_in.shape[-1], width):
        block = slice(start, start + width)
        inputs = cov_in[..., block, block]
        predictor[..., block, block] = linalg.solve(inputs + _ridge(inputs), cross_cov[..., block, block])
    return predictor


def _projection(
    moments: KVMoments, sqrt: torch.Tensor, inverse: torch.Tensor, cross: str | None, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """(encoder, decoder, mean in, mean out, factors of an "rrr" coder), components ordered by weighted spread.

    Same model (`cross` None): principal axes of the weighted vectors. Across models the moments are of joint
    [producer; consumer] vectors and the coder predicts the consumer's from the producer's: "rrr" is reduced-rank
    regression (the principal axes of the ridge prediction, each KV head predicted from its own producer head, the
    best rank-r linear predictor of that form in the metric); "joint-svd" is the paper's Reuse: principal axes of the
    joint vectors, with a ridge encoder from the producer's (units of one layer, per head).
    """
    cov = moments.covariance()
    mean = moments.mean()
    dim = sqrt.shape[-1]
    if cross is None:
        cov_in, weighted, mean_in, mean_out = cov, sqrt @ cov @ sqrt, mean, mean
        predictor = torch.eye(dim, dtype=cov.dtype).expand_as(cov)
    else:
        cov_in, cross_cov = cov[..., :dim, :dim], cov[..., :dim, dim:]
        mean_in, mean_out = mean[..., :dim], mean[..., dim:]
        ridge = _ridge(cov_in)
        predictor = _predictor(cov_in, cross_cov, head_dim)
    if cross == "joint-svd":
        # Balance the halves so neither model's vectors dominate the joint axes.
        weighted_out = sqrt @ cov[..., dim:, dim:] @ sqrt
        balance = (weighted_out.diagonal(dim1=-2, dim2=-1).sum(-1) / cov_in.diagonal(dim1=-2, dim2=-1).sum(-1)).sqrt()
        eye = torch.eye(dim, dtype=cov.dtype).expand_as(sqrt)
        joint_map = torch.cat([torch.cat([balance[..., None, None] * eye, torch.zeros_like(sqrt)], -1),
                               torch.cat([torch.zeros_like(sqrt), sqrt], -1)], -2)  # fmt: skip
        eigvals, eigvecs = torch.linalg.eigh(joint_map @ cov @ joint_map)
        axes = torch.flip(eigvecs, [-1])[..., :dim]  # (H, 2d, d), largest first
        # Latent z = [a; b] joint_map axes; ridge-predicted from a alone, decoded by the consumer half of the axes.
        encoder = linalg.solve(cov_in + ridge, torch.cat([cov_in, cross_cov], -1) @ joint_map @ axes)
        spread = torch.einsum("hdc,hde,hec->hc", encoder, cov_in, encoder).clamp(min=1e-12).sqrt()
        encoder = encoder / spread.unsqueeze(-2)
        decoder = spread.unsqueeze(-1) * axes[..., dim:, :].transpose(-1, -2) @ inverse
        decoder = decoder * _spread_gain(encoder, decoder, cov_in, cov[..., dim:, dim:], sqrt)
        return encoder.float(), decoder.float(), mean_in.float(), mean_out.float(), None
    if cross is not None:
        weighted = sqrt @ predictor.transpose(-1, -2) @ cov_in @ predictor @ sqrt
    eigvals, eigvecs = torch.linalg.eigh(weighted)
    order = torch.argsort(eigvals, dim=-1, descending=True)
    spread = torch.gather(eigvals, -1, order).clamp(min=1e-12).sqrt()
    basis = torch.gather(eigvecs, -1, order.unsqueeze(1).expand_as(eigvecs))
    if cross is None:
        encoder = sqrt @ basis / spread.unsqueeze(-2)
        decoder = spread.unsqueeze(-1) * basis.transpose(-1, -2) @ inverse
        return encoder.float(), decoder.float(), mean_in.float(), mean_out.float(), None
    # Predictor and metric work head by head, so both matrices factor around the basis (`factored_coders`); the
    # coder is the stored one, its basis rounded to float16.
    factors = {
        "basis": basis.half(),
        "spread": spread.float(),
        "head_encoder": _diagonal_blocks(predictor @ sqrt, head_dim).float(),
        "head_decoder": _diagonal_blocks(inverse, head_dim).float(),
    }
    encoder, decoder = factored_coders(*factors.values())
    gain = _spread_gain(encoder, decoder, cov_in, cov[..., dim:, dim:], sqrt).float()
    factors["head_decoder"] = factors["head_decoder"] * gain.unsqueeze(-1)
    return encoder, decoder * gain, mean_in.float(), mean_out.float(), factors


def fit_layer_basis(
    moments: KVMoments,
    metric: torch.Tensor,
    cross: str | None = None,
    max_sample: int = 8192,
    step_sample: int = 2048,
    head_dim: int | None = None,
) -> LayerBasis:
    """A coder in the metric's space (see `_projection` for `cross`; a cross-model predictor works within runs of
    `head_dim`, default the whole block), then the best step per bit width and each component's weighted error,
    measured on the moments' token sample."""
    sqrt, inverse = _sqrt_and_inverse(metric)
    encoder, decoder, mean_in, mean_out, factors = _projection(
        moments, sqrt, inverse, cross, head_dim or sqrt.shape[-1]
    )
    dim = sqrt.shape[-1]
    sample = moments.samples()
    # An evenly spread subset, so the first `step_sample` rows used for the step search are spread too.
    sample = sample[torch.randperm(sample.shape[0], generator=torch.Generator().manual_seed(0))[:max_sample]]
    unit = torch.einsum("nhd,hdc->nhc", sample[..., :dim] - mean_in, encoder)
    residual = 0.0
    if cross is not None:
        predicted = torch.einsum("nhc,hcd->nhd", unit, decoder) + mean_out
        error = torch.einsum("nhd,hde->nhe", sample[..., dim:] - predicted, sqrt.float())
        residual = float(error.pow(2).sum((-2, -1)).mean())
    # A component's weighted error per unit of its coefficient: its decoder row's norm in the metric.
    spread = torch.einsum("hcd,hde->hce", decoder, sqrt.float()).norm(dim=-1)
    rms = unit.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
    steps = torch.zeros(MAX_BITS + 1)
    distortion = torch.zeros(*spread.shape, MAX_BITS + 1)
    distortion[..., 0] = (unit * spread).pow(2).mean(0)
    for bits in range(1, MAX_BITS + 1):
        steps[bits] = _best_step(unit[:step_sample], rms[:step_sample], bits)
        error = unit - _quantize_dequantize(unit, rms, float(steps[bits]), bits)
        distortion[..., bits] = (error * spread).pow(2).mean(0)
    return LayerBasis(mean_in, mean_out, encoder, decoder, steps, distortion, residual, factors)


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
