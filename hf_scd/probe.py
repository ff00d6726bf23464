"""The fit probe: do these artifacts fit this model? Decided by a measurement, not by the weights.

Same-model artifacts record, at calibration, how well the codes of one operating point reconstruct the fitted model's
own K/V on a short fixed text (`FitProbe`: its token ids, the point, the figures). A model with other weights (the
same model in another precision, or requantized) is probed the same way, and fits if no layer's figure comes more
than `FIT_TOLERANCE` above the recorded one. Closeness of the weights cannot decide it: quantization noise moves the
weights as far as a LoRA fine-tune does.

The figures are, per layer and for keys and values, the relative squared error of the reconstruction,
||x - x'||^2 / ||x||^2 over the coded tokens (the exact sink left out). They are compared layer by layer, not as a
mean, because the mean over layers hides a layer the codes no longer fit: on Qwen2.5-Coder-0.5B one layer of 24
replaced by noise raises the mean by 17% and that layer's figure twentyfold. Figures below `ERROR_FLOOR` count as
the floor: some layers code almost losslessly (Qwen's 3e-6), where bf16 rounding alone would double the figure.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache

from .arch import ModelHandle
from .compat import with_cache
from .errors import ArtifactMismatchError
from .recording import TokenRecord
from .schema import FitProbe

if TYPE_CHECKING:
    from .artifacts import SCDArtifacts

# Tokens of real text calibration probes with: enough coded tokens per KV head for stable figures, cheap to run.
PROBE_TOKENS = 128
# How far above its recorded figure any layer's K or V may come and still fit. Measured at the default point, worst
# layer, SmolLM2-135M / Qwen2.5-Coder-0.5B (`python scripts/add_fit_probe.py --measure --kl FOLDER`): int8 per row
# +1.9% / +2.1% (+1.7% / +2.4% computed in bf16), 4-bit blocks of 32 +3.8% / +5.3% and of 64 +17% / +12%, the LoRA
# variants +11% / +41%, 3-bit blocks of 32 +125% / +27%, one layer replaced by noise +925% or more. What the copies
# accepted at +50% do to their own transfer at that point: KL within +40% of the fitted model's (Qwen's LoRA -21%);
# SmolLM2's 3-bit copy, refused, +334%.
FIT_TOLERANCE = 0.5
# A relative squared error of 1e-4 (1% RMS): below it, a layer's codes are as good as lossless.
ERROR_FLOOR = 1e-4

# A cache is made per request: the verdict is kept per model, artifacts, probe and weights.
_VERDICTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, FitVerdict]] = weakref.WeakKeyDictionary()

Figures = tuple[tuple[float, ...], ...]  # (layers, K/V)


@dataclass(frozen=True)
class FitVerdict:
    """A model's probe figures against those calibration recorded."""

    point: str
    measured: Figures
    recorded: Figures

    @property
    def worst(self) -> tuple[int, int, float]:
        """(layer, K/V index, excess) of the figure furthest above its recorded one, both floored at ERROR_FLOOR."""
        excess = [
            (max(m, ERROR_FLOOR) / max(r, ERROR_FLOOR) - 1.0, layer, kind)
            for layer, (measured, recorded) in enumerate(zip(self.measured, self.recorded, strict=True))
            for kind, (m, r) in enumerate(zip(measured, recorded, strict=True))
        ]
        value, layer, kind = max(excess)
        return layer, kind, value

    @property
    def fits(self) -> bool:
        return self.worst[2] <= FIT_TOLERANCE

    def describe(self) -> str:
        layer, kind, excess = self.worst
        name = ("keys", "values")[kind]
        measured, recorded = mean_error(self.measured), mean_error(self.recorded)
        return (
            f"the fit probe through the codes of point {self.point} reconstructs this model's K/V at worst "
            f"{excess:+.1%} from the fitted weights' (layer {layer} {name}: relative error "
            f"{self.measured[layer][kind]:.4g} against {self.recorded[layer][kind]:.4g}; mean over layers "
            f"{measured:.4g} against {recorded:.4g}); the tolerance is +{FIT_TOLERANCE:.0%}"
        )


def mean_error(figures: Figures) -> float:
    """The mean of the figures over layers and K/V."""
    return sum(map(sum, figures)) / sum(map(len, figures))


def fit_verdict(artifacts: SCDArtifacts, handle: ModelHandle) -> FitVerdict:
    """The model's probe figures against the artifacts' recorded ones, measured once per model and weights."""
    probe = artifacts.config.fit_probe
    memo = _VERDICTS.setdefault(handle.model, {})
    key = (artifacts.artifacts_id, probe, handle.fingerprint)
    if key not in memo:
        measured = probe_errors(artifacts, handle, probe.token_ids, probe.point)
        memo[key] = FitVerdict(probe.point, measured, probe.errors)
    return memo[key]


@torch.no_grad()
def probe_errors(artifacts: SCDArtifacts, handle: ModelHandle, token_ids: tuple[int, ...], point: str) -> Figures:
    """The model's K/V for `token_ids` (one row from position 0) through the codes of `point` and back: per layer,
    the relative squared error of the keys and of the values over the coded tokens (see the module docstring)."""
    param = next(handle.model.parameters())
    vocab = handle.model.config.vocab_size
    if max(token_ids) >= vocab:
        raise ArtifactMismatchError(
            f"the artifacts' fit probe has token ids beyond this model's vocabulary of {vocab}: they were fitted "
            "on a model with another tokenizer"
        )
    ids = torch.tensor([token_ids], dtype=torch.long, device=param.device)
    cache = DynamicCache(config=handle.model.config)
    handle.decoder(input_ids=ids, **with_cache(handle.decoder, cache), use_cache=True)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    positions = torch.arange(ids.shape[1], device=param.device).unsqueeze(0)
    cos, sin = handle.rotary_cos_sin(positions, param.dtype)
    mask = torch.ones_like(ids, dtype=torch.bool)
    record = TokenRecord(ids, positions, cos, sin, mask, cos.new_zeros(*ids.shape, 0, 0))
    plan = artifacts.plan(point, param.device)
    if plan.patch_layers:
        raise ValueError(f"point {point} patches layers: the fit probe measures same-model (Reuse) points only")
    decoded = plan.decode_layers(plan.encode(kv, record, lambda layer: None), record, handle, param.dtype)
    rebuilt = plan.finish(decoded, record, handle)
    skip = plan.sink.exact
    return tuple(
        tuple(
            float((exact - coded).float()[:, :, skip:].square().sum() / exact.float()[:, :, skip:].square().sum())
            for exact, coded in zip(pair, rebuilt_pair, strict=True)
        )
        for pair, rebuilt_pair in zip(kv, rebuilt, strict=True)
    )


def measure_fit_probe(artifacts: SCDArtifacts, model: nn.Module, token_ids: list[int], point: str) -> FitProbe:
    """The probe calibration records: `model`'s figures on `token_ids` (the first PROBE_TOKENS of them) at `point`."""
    token_ids = tuple(token_ids[:PROBE_TOKENS])
    return FitProbe(token_ids, point, probe_errors(artifacts, ModelHandle(model), token_ids, point))
