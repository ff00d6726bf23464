"""Offline calibration: from a model and text to `SCDArtifacts` (bases, steps, bit-allocation plan).

Same-model calibration is the pipeline of `pipeline.py` with the model as its own consumer; `calibrate_pair` adds
the Patch steps for a fine-tuned consumer.
"""

from __future__ import annotations

import torch

from ..arch import ModelHandle
from ..artifacts import SCDArtifacts
from .pair import calibrate_pair
from .pipeline import Job, run_pipeline
from .plan import validate_points

__all__ = ["calibrate", "calibrate_pair", "validate_points"]

DEFAULT_RATIOS = (2.5, 3, 4, 5, 6, 8, 10, 12)
# The default point is the most compressed one whose validation KL stays within this bound.
DEFAULT_POINT_MAX_KL = 0.003
# Leading real tokens of each row that ship exactly: the attention sink. On SmolLM2-135M keeping one exact token cut
# the 4x point's KL 3.5x (codec v2); with joint units, 4 took the 8x point's KL at 2K-token prefixes from 0.0062 to
# 0.0025.
EXACT_TOKENS = 4
# The narrowest joint basis worth having: a unit takes the fewest layers (a divisor of the layer count) whose KV heads
# are at least this wide together. On SmolLM2-135M (192 K or V dims a layer) that is 5 layers; validation KL at 8x was
# 0.0086 for one-layer units and 0.0027 for five. On Qwen2.5-Coder-0.5B (128 a layer) it is 8 layers: 0.0046 for
# 4-layer units and 0.0032 for 8.
UNIT_WIDTH = 960


def default_unit_layers(num_layers: int, layer_width: int, width: int = UNIT_WIDTH) -> int:
    """The fewest layers, dividing `num_layers`, whose `layer_width`-wide K (or V) vectors are at least `width` wide
    together (all layers if none is): units of equal size cover every layer."""
    return min(
        (size for size in range(1, num_layers + 1) if num_layers % size == 0 and size * layer_width >= width),
        default=num_layers,
    )


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
    unit_layers: int | None = None,
    progress: bool = True,
) -> SCDArtifacts:
    """Fit bases and quantizers on `calibration_docs`, plan one bit allocation per target ratio, and measure each
    point's KL and top-1 agreement on `validation_docs` (prefix shipped, the rest teacher-forced).

    `weigh_layers` measures each layer's sensitivity so bits go where errors cost most; without it every layer's
    squared error counts the same (faster, for tests). `unit_layers` consecutive layers share one joint basis
    (default `default_unit_layers`); it must divide the layer count.
    """
    if unit_layers is None:
        shape = ModelHandle(model).shape
        unit_layers = default_unit_layers(shape.num_layers, shape.num_kv_heads * shape.head_dim)
    job = Job(
        model,
        model,
        calibration_docs,
        validation_docs,
        model_name=model_name,
        ratios=ratios,
        base_model=base_model,
        data_description=data_description,
        exact_tokens=exact_tokens,
        weigh_layers=weigh_layers,
        validation_prefix=validation_prefix,
        unit_layers=unit_layers,
        joint_basis=True,
        default_max_kl=DEFAULT_POINT_MAX_KL,
        progress=progress,
    )
    return run_pipeline(job)
