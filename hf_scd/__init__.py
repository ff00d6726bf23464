"""hf-scd: Semantic Cache Distillation for transformers. Ship a KV cache as compact codes; continue elsewhere."""

from .artifacts import OperatingPoint, SCDArtifacts
from .cache import SCDCache, SCDLayer
from .errors import (
    ArtifactError,
    ArtifactFitWarning,
    ArtifactMismatchError,
    CacheStateError,
    CorruptPayloadError,
    OperatingPointError,
    PayloadError,
    PayloadLimitError,
    PayloadVersionError,
    SCDError,
    TruncatedPayloadError,
    UnsupportedModelError,
)
from .payload import SCDPayload

__version__ = "0.1.0"
__all__ = [
    "ArtifactError",
    "ArtifactFitWarning",
    "ArtifactMismatchError",
    "CacheStateError",
    "CorruptPayloadError",
    "OperatingPoint",
    "OperatingPointError",
    "PayloadError",
    "PayloadLimitError",
    "PayloadVersionError",
    "SCDArtifacts",
    "SCDCache",
    "SCDError",
    "SCDLayer",
    "SCDPayload",
    "TruncatedPayloadError",
    "UnsupportedModelError",
]
