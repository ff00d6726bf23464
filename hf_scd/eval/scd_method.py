"""SCD as a `KVTransfer`: the real path, bytes and all (encode, serialize, parse, rebuild)."""

from __future__ import annotations

import torch

from ..artifacts import SCDArtifacts
from ..cache import SCDCache
from ..payload import SCDPayload
from .baselines import prefill


class SCDTransfer:
    """Ship a prefix through an `SCDPayload` at one operating point; bytes are the whole serialized payload."""

    def __init__(self, artifacts: SCDArtifacts, point: str):
        self.artifacts = artifacts
        self.point = artifacts.point(point).name
        self.name = f"scd-{self.point}"

    @torch.inference_mode()
    def transfer(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[SCDCache, int]:
        producer = prefill(model, input_ids, attention_mask, SCDCache(self.artifacts, model, point=self.point))
        blob = producer.encode().to_bytes()
        return SCDCache.from_payload(SCDPayload.from_bytes(blob), self.artifacts, model), len(blob)
