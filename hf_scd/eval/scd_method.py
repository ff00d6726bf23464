"""SCD as a `Transfer`, same-model or across a pair alike: the real path, bytes and all (encode, serialize, parse,
rebuild)."""

from __future__ import annotations

import torch

from ..artifacts import SCDArtifacts
from ..cache import SCDCache
from ..entropy import compress_payload, decompress_payload
from ..payload import SCDPayload
from ..prefill import prefill
from .transfer import Shipment, Transfer


class SCDTransfer(Transfer):
    """Ship a prefix through an `SCDPayload` at one operating point; bytes are the whole serialized payload, or with
    `entropy` the payload through the entropy stage (`hf_scd.entropy`, method "scd-<point>+zstd")."""

    def __init__(self, producer: torch.nn.Module, artifacts: SCDArtifacts, point: str, entropy: bool = False):
        super().__init__(producer)
        self.artifacts = artifacts
        self.point = artifacts.point(point).name
        self.entropy = entropy
        self.name = f"scd-{self.point}" + ("+zstd" if entropy else "")

    def send(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Shipment:
        cache = SCDCache(self.artifacts, self.producer, point=self.point)
        payload = prefill(self.producer, input_ids, attention_mask, cache).encode(packed=not self.entropy)
        blob = compress_payload(payload, self.artifacts) if self.entropy else payload.to_bytes()
        return Shipment(blob, len(blob), input_ids, attention_mask)

    def receive(self, consumer: torch.nn.Module, shipment: Shipment) -> SCDCache:
        if self.entropy:
            payload = decompress_payload(shipment.content, self.artifacts)
        else:
            payload = SCDPayload.from_bytes(shipment.content)
        return SCDCache.from_payload(payload, self.artifacts, consumer)
