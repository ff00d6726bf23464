"""Fit the fidelity map a producer predicts a request's KL with (`hf_scd.fidelity`).

Calibration has what the check needs: the query energy the key metric is made of and each layer's sensitivity. The
map itself is fitted on what validation measures anyway: for every (document, operating point), the weighted
distortion D of the shipped cache and the KL of the continuation. Over the points' range of distortions KL follows a
power of D closely (a line in log-log), so that line is the map.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..arch import ModelHandle
from ..fidelity import TAIL_TOKENS, DistortionMetric
from ..schema import KINDS, FidelityMap, TailLine
from .plan import Measurement

if TYPE_CHECKING:
    from .pipeline import Calibration

# Measurements at or below these are bf16 rounding, not codes: they would only bend the line.
MIN_KL, MIN_DISTORTION = 1e-7, 1e-12


def _significant(value: float) -> float:
    """`value` to 6 significant digits: the config stays readable and the metric loses nothing that matters."""
    return float(f"{value:.6g}")


def fidelity_parts(run: Calibration) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
    """Per layer the consumer's mean squared queries (H, d) and (key, value) sensitivity, from a run whose
    `collect` and `weigh_layers` steps have run."""
    energy = [run.queries[layer].mean().float() for layer in run.layers]
    weights = [tuple(run.weights[(layer, kind)] for kind in KINDS) for layer in run.layers]
    return energy, weights


def fidelity_metric(run: Calibration, device: torch.device | str = "cpu") -> DistortionMetric:
    energy, weights = fidelity_parts(run)
    return DistortionMetric.of(energy, weights, ModelHandle(run.job.consumer), device)


def fit_log_line(
    measured: dict[str, list[Measurement]], predictor: str = "distortion", least: float = MIN_DISTORTION
) -> tuple[float, float, float, int] | None:
    """(slope, intercept, RMS residual, samples) of the least-squares line log KL = intercept + slope log x, x the
    measurements' `predictor` (the weighted distortion D, or the tail probe's `tail_kl`), through the measurements
    above rounding; None when they fix no rising line (fewer than two distinct values, or a slope <= 0, as on toy
    models)."""
    pairs = [
        (math.log(getattr(m, predictor)), math.log(m.kl))
        for runs in measured.values()
        for m in runs
        if getattr(m, predictor) is not None and getattr(m, predictor) > least and m.kl > MIN_KL
    ]
    if len(pairs) < 2:
        return None
    xs, ys = torch.tensor(pairs, dtype=torch.float64).unbind(-1)
    spread = float((xs - xs.mean()).square().sum())
    slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum()) / spread if spread > 0 else 0.0
    if not slope > 0:
        return None
    intercept = float(ys.mean()) - slope * float(xs.mean())
    residual = float((ys - intercept - slope * xs).square().mean().sqrt())
    return slope, intercept, residual, len(pairs)


def continuation_of(docs: list[list[int]], prefix: int) -> int:
    """The continuation every document of a map's measurements teacher-forces after `prefix`: one length for all,
    since it is what the map's predictions are for."""
    lengths = {len(doc) - prefix for doc in docs}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(f"a fidelity map is fitted on one continuation length; these documents give {sorted(lengths)}")
    return lengths.pop()


def fit_fidelity_map(
    run: Calibration, measured: dict[str, list[Measurement]], continuation: int, tail_tokens: int = TAIL_TOKENS
) -> FidelityMap | None:
    """The fidelity map from measurements made with `fidelity_metric(run)` and a tail probe of `tail_tokens`, each
    the mean KL over `continuation` teacher-forced tokens: the line from D (`fit_log_line`), the tail probe's line
    where one fits, and the parts the producer's metric is rebuilt from; None when no line from D fits."""
    line = fit_log_line(measured)
    if line is None:
        return None
    slope, intercept, residual, samples = line
    tail_line = fit_log_line(measured, "tail_kl", MIN_KL)
    tail = None if tail_line is None else TailLine(tail_tokens, *tail_line)
    energy, weights = fidelity_parts(run)
    return FidelityMap(
        query_energy=tuple(tuple(tuple(map(_significant, head)) for head in layer.tolist()) for layer in energy),
        layer_weights=tuple(tuple(map(_significant, pair)) for pair in weights),
        slope=slope,
        intercept=intercept,
        residual=residual,
        samples=samples,
        continuation=continuation,
        tail=tail,
    )
