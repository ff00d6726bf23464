"""Offline calibration: from a model and text to `SCDArtifacts` (bases, steps, bit-allocation plan).

Same-model calibration is the pipeline of `pipeline.py` with the model as its own consumer; `calibrate_pair` adds
the Patch steps for a fine-tuned consumer.
"""

from __future__ import annotations

import torch

from ..artifacts import SCDArtifacts
from .pair import calibrate_pair
from .pipeline import Job, run_pipeline
from .plan import validate_points

__all__ = ["calibrate", "calibrate_pair", "validate_points"]

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
        default_max_kl=DEFAULT_POINT_MAX_KL,
        progress=progress,
    )
    return run_pipeline(job)
