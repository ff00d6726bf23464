"""The per-request fidelity check: how much will this request's codes cost the consumer, and which point to ship.

A validation KL says what a point costs on calibration-like text; a request unlike it (code, another language, random
ids) may cost far more. The producer holds the exact K/V, so it measures the real distortion of the codes: it decodes
them once and weighs the error in the metric calibration allocates bits in (keys by the energy of the queries that
read them, values by the output projection's Gram matrix), each layer scaled by its measured sensitivity (KL per unit
of weighted error). That sum D is a first-order KL; a map fitted at calibration (log KL = intercept + slope log D, on
validation documents x operating points) turns it into the predicted KL of the continuation.

D cannot see how sensitive this request's attention is to an error: on input unlike the calibration text (random ids,
another language) the same D costs more KL. So where the map has a tail line and the request is longer than its tail,
the producer also measures the KL itself, on the request's own last tokens (the tail probe): it runs them over the
rebuilt cache of the tokens before them and over its exact cache, and maps the KL between the two next-token
distributions with a second line fitted at calibration (the tail's tokens sit nearer the coded part than an average
continuation token does). The prediction is the largest of the two and of the tail's KL itself (`predict_kl`).
`choose_point` then ships the cheapest point whose prediction is within the caller's `max_kl`, and every token's K/V
in bf16 (the reserved `EXACT_POINT`) when none is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from .arch import ModelHandle
from .codes import LayerCodes
from .compat import with_cache
from .errors import OperatingPointError
from .recording import TokenRecord
from .schema import EXACT_POINT, FidelityMap

if TYPE_CHECKING:
    from .artifacts import SCDArtifacts

KV = tuple[torch.Tensor, torch.Tensor]
# Tokens of a request's tail that calibration probes: enough for a steady mean KL, a small share of a long prompt.
TAIL_TOKENS = 32


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


def predict_kl(fidelity: FidelityMap, distortion: float, tail_kl: float | None = None) -> float:
    """The continuation's next-token KL for a request whose codes have weighted distortion D and whose tail probe
    measured `tail_kl`: the largest of the map from D, the tail's line, and the tail's KL itself.

    The tail ranks requests far better than D, but its line learnt the level of calibration text, where the
    continuation pays about half the tail's KL; out of distribution it pays all of it (random ids on
    Qwen2.5-Coder-0.5B at 6x: tail 0.030, continuation 0.031, the line 0.012). So the tail's own KL floors the
    prediction, and a point is shipped for a `max_kl` only where all three say it is within it."""
    from_tail = kl_from_tail(fidelity, tail_kl)
    from_distortion = kl_from_distortion(fidelity, distortion)
    return from_distortion if from_tail is None else max(from_distortion, from_tail, tail_kl)


def kl_from_distortion(fidelity: FidelityMap, distortion: float) -> float:
    """The map from D alone: log KL = intercept + slope log D."""
    return _on_line(fidelity.intercept, fidelity.slope, distortion)


def kl_from_tail(fidelity: FidelityMap, tail_kl: float | None) -> float | None:
    """The tail probe's line alone, or None without a probe or a line."""
    if tail_kl is None or fidelity.tail is None:
        return None
    return _on_line(fidelity.tail.intercept, fidelity.tail.slope, tail_kl)


def _on_line(intercept: float, slope: float, x: float) -> float:
    return math.exp(intercept + slope * math.log(max(x, 1e-30)))


class TailProbe:
    """The request's own last `tokens` tokens, teacher-forced over a cache of the tokens before them: its exact
    next-token log-probabilities are computed once per request, and each point's rebuilt cache is measured against
    them (`kl`). Unavailable (`usable` False) where a row is not longer than the tail, where the forward had
    embeddings rather than ids, or where the model has no language-model head."""

    def __init__(self, handle: ModelHandle, exact: Sequence[KV], record: TokenRecord, tokens: int):
        self.handle, self.record, self.tokens = handle, record, tokens
        self.start = record.input_ids.shape[1] - tokens
        real = record.attention_mask.sum(-1)
        self.usable = (
            self.start > 0
            and bool((real > tokens).all())
            and bool((record.input_ids[:, self.start :] >= 0).all())
            and hasattr(handle.model, "get_output_embeddings")
            and handle.model.get_output_embeddings() is not None
        )
        self._exact = exact
        self._reference: torch.Tensor | None = None

    @torch.no_grad()
    def _log_probs(self, kv: Sequence[KV]) -> torch.Tensor:
        """(batch, tokens, vocab) float32 log-probabilities of the tail's next tokens over `kv` cut before the tail."""
        cache = DynamicCache(config=self.handle.model.config)
        for index, (keys, values) in enumerate(kv):
            cache.update(keys[:, :, : self.start], values[:, :, : self.start], index)
        record = self.record
        logits = self.handle.model(
            input_ids=record.input_ids[:, self.start :],
            attention_mask=record.attention_mask.long(),
            position_ids=record.position_ids[:, self.start :],
            **with_cache(self.handle.model, cache),
            use_cache=True,
        ).logits
        return torch.log_softmax(logits.float(), -1)

    def kl(self, rebuilt: Sequence[KV]) -> float:
        """The worst row's mean KL(exact || rebuilt) over the tail's next tokens."""
        if self._reference is None:
            self._reference = self._log_probs(self._exact)
        exact, test = self._reference, self._log_probs(rebuilt)
        return float((exact.exp() * (exact - test)).sum(-1).mean(-1).max())


def tail_probe(artifacts: SCDArtifacts, handle: ModelHandle, kv: Sequence[KV], record: TokenRecord) -> TailProbe | None:
    """The request's tail probe, if the artifacts' map has a tail line and the request can be probed."""
    tail = artifacts.config.fidelity.tail if artifacts.config.fidelity is not None else None
    if tail is None:
        return None
    probe = TailProbe(handle, kv, record, tail.tokens)
    return probe if probe.usable else None


@dataclass(frozen=True)
class PointChoice:
    """What a check found: the point, its predicted KL for this cache, its codes (what ships), and the prediction
    of every point the check measured, cheapest first; and what the prediction was made from: the codes' weighted
    distortion, and the KL the tail probe measured (None where no probe ran)."""

    point: str
    predicted_kl: float
    layers: list[LayerCodes]
    checked: dict[str, float]
    distortion: float
    tail_kl: float | None = None


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
    probe: TailProbe | None = None,
) -> PointChoice:
    """`point`'s codes for this cache and the KL they are predicted to cost: encoded once, decoded once, the
    distortion against `kv` measured in the metric and, where the request can be probed, the KL of its tail over
    the rebuilt cache (`probe`: one `tail_probe` shared by several checks of the same request). A batch is judged by
    its worst row."""
    device, dtype = kv[0][0].device, kv[0][0].dtype
    metric = artifacts.distortion_metric(handle, device)  # refuses artifacts without a map before any coding
    probe = probe if probe is not None else tail_probe(artifacts, handle, kv, record)
    plan = artifacts.plan(point, device)
    layers = plan.encode(kv, record, patch_input, packed=False)  # decoded next: packed only if shipped
    rebuilt = plan.finish(plan.decode_layers(layers, record, handle, dtype), record, handle)
    worst = float(metric.distortion(kv, rebuilt, record.attention_mask).max())
    tail_kl = probe.kl(rebuilt) if probe is not None else None
    predicted = predict_kl(artifacts.config.fidelity, worst, tail_kl)
    return PointChoice(point, predicted, layers, {point: predicted}, worst, tail_kl)


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
    probe = tail_probe(artifacts, handle, kv, record)

    def predicted(index: int) -> float:
        if index not in checks:
            checks[index] = check_point(artifacts, handle, kv, record, patch_input, names[index], probe)
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
    return replace(chosen, checked=checked)
