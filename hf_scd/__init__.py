"""hf-scd: Semantic Cache Distillation for transformers. Ship a KV cache as compact codes; continue elsewhere."""

from .artifacts import OperatingPoint, SCDArtifacts
from .cache import SCDCache, SCDLayer
from .errors import (
    ArtifactError,
    ArtifactFitWarning,
    ArtifactMismatchError,
    AuthenticationError,
    CacheStateError,
    ConnectionLostError,
    CorruptPayloadError,
    OperatingPointError,
    PayloadError,
    PayloadLimitError,
    PayloadVersionError,
    ProducerAbortedError,
    RequestError,
    SCDError,
    TransferError,
    TransferTimeoutError,
    TruncatedPayloadError,
    UnsupportedModelError,
)
from .payload import SCDPayload

__version__ = "0.1.0"
__all__ = [
    "ArtifactError",
    "ArtifactFitWarning",
    "ArtifactMismatchError",
    "AuthenticationError",
    "CacheStateError",
    "ConnectionLostError",
    "CorruptPayloadError",
    "OperatingPoint",
    "OperatingPointError",
    "PayloadError",
    "PayloadLimitError",
    "PayloadVersionError",
    "ProducerAbortedError",
    "RequestError",
    "SCDArtifacts",
    "SCDCache",
    "SCDError",
    "SCDLayer",
    "SCDPayload",
    "TransferError",
    "TransferTimeoutError",
    "TruncatedPayloadError",
    "UnsupportedModelError",
]
