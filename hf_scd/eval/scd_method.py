"""SCD as a `Transfer`, same-model or across a pair alike: the real path, bytes and all (encode, serialize, parse,
rebuild)."""

from __future__ import annotations

import torch

from ..artifacts import SCDArtifacts
from ..cache import SCDCache
from ..payload import SCDPayload
from ..prefill import prefill
from .transfer import Shipment, Transfer


class SCDTransfer(Transfer):
    """Ship a prefix through an `SCDPayload` at one operating point; bytes are the whole serialized payload."""

    def __init__(self, producer: torch.nn.Module, artifacts: SCDArtifacts, point: str):
        super().__init__(producer)
        self.artifacts = artifacts
        self.point = artifacts.point(point).name
        self.name = f"scd-{self.point}"

    def send(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Shipment:
        cache = SCDCache(self.artifacts, self.producer, point=self.point)
        blob = prefill(self.producer, input_ids, attention_mask, cache).encode().to_bytes()
        return Shipment(blob, len(blob), input_ids, attention_mask)

    def receive(self, consumer: torch.nn.Module, shipment: Shipment) -> SCDCache:
        return SCDCache.from_payload(SCDPayload.from_bytes(shipment.content), self.artifacts, consumer)
