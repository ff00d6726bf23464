"""The one transfer protocol every evaluated method implements, and the oracle that ships only token ids.

A method moves a prefix prefilled by its producer to a consumer. It splits into `send` (the producer prefills and packs
what crosses the wire) and `receive` (the consumer turns that into a cache), so the consumer's share of the work can be
timed and its FLOPs counted apart from the producer's. Same-model transfer is the case where the consumer is the
producer: the protocol and the methods do not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache

from ..prefill import prefill


def rebuild_cache(model, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A fresh cache for ``model`` holding the given (keys, values) per layer."""
    cache = DynamicCache(config=model.config)
    for layer_idx, (keys, values) in enumerate(layers):
        cache.update(keys, values, layer_idx)
    return cache


@dataclass
class Shipment:
    """What crossed the wire for one batch of prefixes, and its size."""

    content: object
    nbytes: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None


class Transfer(ABC):
    """A way to move a prefix prefilled by `producer` to a consumer (the producer itself, or a model with other
    weights); `name` keys the method's results."""

    name: str

    def __init__(self, producer: torch.nn.Module):
        self.producer = producer

    @abstractmethod
    def send(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Shipment:
        """The producer's half: prefill ``input_ids`` and pack what would cross the wire."""

    @abstractmethod
    def receive(self, consumer: torch.nn.Module, shipment: Shipment) -> Cache:
        """The consumer's half: a cache the consumer can continue from."""

    @torch.inference_mode()
    def transfer(
        self, consumer: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[Cache, int]:
        """Send and receive: the consumer's cache and the bytes that crossed the wire."""
        shipment = self.send(input_ids, attention_mask)
        return self.receive(consumer, shipment), shipment.nbytes


class Recompute(Transfer):
    """The oracle: ship token ids only; the consumer prefills the prefix itself."""

    name = "oracle"

    def send(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Shipment:
        return Shipment(None, 0, input_ids, attention_mask)

    def receive(self, consumer: torch.nn.Module, shipment: Shipment) -> Cache:
        return prefill(consumer, shipment.input_ids, shipment.attention_mask)
