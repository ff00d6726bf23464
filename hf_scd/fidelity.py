"""The per-request fidelity check: how much will this request's codes cost the consumer, and which point to ship.

A validation KL says what a point costs on calibration-like text; a request unlike it (code, another language, random
ids) may cost far more. The producer holds the exact K/V, so it measures the real distortion of the codes: it decodes
them once and weighs the error in the metric calibration allocates bits in (keys by the energy of the queries that
read them, values by the output projection's Gram matrix), each layer scaled by its measured sensitivity (KL per unit
of weighted error). That sum D is a first-order KL; a map fitted at calibration (log KL = intercept + slope log D, on
validation documents x operating points) turns it into the predicted KL of the continuation. `choose_point` then
ships the cheapest point whose prediction is within the caller's `max_kl`, and every token's K/V in bf16 (the
reserved `EXACT_POINT`) when none is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .arch import ModelHandle
from .codes import LayerCodes
from .errors import OperatingPointError
from .recording import TokenRecord
from .schema import EXACT_POINT, FidelityMap

if TYPE_CHECKING:
    from .artifacts import SCDArtifacts

KV = tuple[torch.Tensor, torch.Tensor]


def key_metric(query_energy: torch.Tensor) -> torch.Tensor:
    """(H, d) mean squared queries -> (H, d, d) diagonal key metric.

    RoPE turns the logit into q^T R(m-n) k with a relative rotation in each (i, i + d/2) plane; averaged over
    offsets, each plane's weight is isotropic, so both dimensions of a pair get their mean query energy. (So the
    metric weighs a post-RoPE key error as it weighs the de-rotated one.)
    """
    half = query_energy.shape[-1] // 2
    paired = (query_energy[..., :half] + query_energy[..., half:]) / 2
    return torch.diag_embed(torch.cat([paired, paired], -1)).float()


def value_metric(o_proj_weight: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """(hidden, q_heads * d) output projection -> (H, d, d): sum of W_h^T W_h over the query heads of each KV head."""
    weight = o_proj_weight.detach().float().cpu().reshape(o_proj_weight.shape[0], kv_heads, -1, head_dim)
    return torch.einsum("okgd,okge->kde", weight, weight)


@dataclass(frozen=True)
class DistortionMetric:
    """Per layer, the key metric's diagonal (H, d) and the value metric (H, d, d), each already scaled by the layer's
    sensitivity, on one device: a weighted error summed over them is a first-order KL."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @classmethod
    def of(
        cls,
        query_energy: Sequence[torch.Tensor],
        layer_weights: Sequence[tuple[float, float]],
        handle: ModelHandle,
        device: torch.device | str,
    ) -> DistortionMetric:
        """The metric of `handle`'s model: query energy and weights from calibration, value metrics from its
        output projections."""
        shape = handle.shape
        keys, values = [], []
        for layer, (energy, (key_weight, value_weight)) in enumerate(zip(query_energy, layer_weights, strict=True)):
            keys.append((key_weight * key_metric(energy).diagonal(dim1=-2, dim2=-1)).to(device))
            o_proj = handle.attention(layer).o_proj.weight
            values.append((value_weight * value_metric(o_proj, shape.num_kv_heads, shape.head_dim)).to(device))
        return cls(tuple(keys), tuple(values))

    def distortion(self, exact: Sequence[KV], rebuilt: Sequence[KV], mask: torch.Tensor) -> torch.Tensor:
        """(batch,) per row: the sensitivity-weighted squared error of `rebuilt` against `exact` (per layer
        post-RoPE keys and values, (batch, H, seq, d)), summed over layers and heads, averaged over real tokens."""
        total = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for (keys, values), (keys_out, values_out), key_metric_diag, value_metric_ in zip(
            exact, rebuilt, self.keys, self.values, strict=True
        ):
            key_error = (keys.float() - keys_out.float()).square()
            total += torch.einsum("bhsd,hd->bs", key_error, key_metric_diag)
            value_error = values.float() - values_out.float()
            total += torch.einsum("bhsd,hde,bhse->bs", value_error, value_metric_, value_error)
        real = mask.float()
        return (total * real).sum(-1) / real.sum(-1)


def predict_kl(fidelity: FidelityMap, distortion: float) -> float:
    """The map calibration fitted: the continuation's next-token KL for a request of weighted distortion D."""
    return math.exp(fidelity.intercept + fidelity.slope * math.log(max(distortion, 1e-30)))


@dataclass(frozen=True)
class PointChoice:
    """What a check found: the point, its predicted KL for this cache, its codes (what ships), and the prediction
    of every point the check measured, cheapest first."""

    point: str
    predicted_kl: float
    layers: list[LayerCodes]
    checked: dict[str, float]


def check_max_kl(max_kl: float) -> None:
    if isinstance(max_kl, bool) or not isinstance(max_kl, int | float) or not max_kl >= 0:
        raise OperatingPointError(f"max_kl must be a number >= 0, got {max_kl!r}")


def check_point(
    artifacts: SCDArtifacts,
    handle: ModelHandle,
    kv: Sequence[KV],
    record: TokenRecord,
    patch_input: Callable[[int], torch.Tensor],
    point: str,
) -> PointChoice:
    """`point`'s codes for this cache and the KL they are predicted to cost: encoded once, decoded once, the
    distortion against `kv` measured in the metric. A batch is judged by its worst row."""
    device, dtype = kv[0][0].device, kv[0][0].dtype
    metric = artifacts.distortion_metric(handle, device)  # refuses artifacts without a map before any coding
    plan = artifacts.plan(point, device)
    layers = plan.encode(kv, record, patch_input)
    rebuilt = plan.finish(plan.decode_layers(layers, record, handle, dtype), record, handle)
    worst = float(metric.distortion(kv, rebuilt, record.attention_mask).max())
    predicted = predict_kl(artifacts.config.fidelity, worst)
    return PointChoice(point, predicted, layers, {point: predicted})


def choose_point(
    artifacts: SCDArtifacts,
    handle: ModelHandle,
    kv: Sequence[KV],
    record: TokenRecord,
    patch_input: Callable[[int], torch.Tensor],
    max_kl: float,
) -> PointChoice:
    """The cheapest point whose predicted KL for this cache is within `max_kl`, else `EXACT_POINT`.

    Points are tried (`check_point`) on a ladder from the cheapest to bf16, starting where validation KL says
    `max_kl` is met, walking cheaper while the prediction stays within it, or more faithful until it is: usually two
    or three encodes.
    """
    check_max_kl(max_kl)
    ladder = sorted((p for p in artifacts.points if not p.patch_layers), key=lambda p: p.bytes_per_token)
    names = [p.name for p in ladder] + [EXACT_POINT]
    checks: dict[int, PointChoice] = {}

    def predicted(index: int) -> float:
        if index not in checks:
            checks[index] = check_point(artifacts, handle, kv, record, patch_input, names[index])
        return checks[index].predicted_kl

    last = len(names) - 1
    index = next((i for i, point in enumerate(ladder) if point.val_kl <= max_kl), last - 1)
    if predicted(index) <= max_kl:
        while index > 0 and predicted(index - 1) <= max_kl:
            index -= 1
    while index < last and predicted(index) > max_kl:
        index += 1
    predicted(index)  # the exact point, reached without a test, is measured too: its prediction ships
    chosen = checks[index]
    checked = {names[i]: checks[i].predicted_kl for i in sorted(checks)}
    return PointChoice(chosen.point, chosen.predicted_kl, chosen.layers, checked)
