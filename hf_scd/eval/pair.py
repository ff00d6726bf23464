"""Cross-variant transfer methods (producer != consumer) and what each costs the consumer.

Every method splits into `send` (the producer prefills and packs what crosses the wire) and `receive` (the consumer
turns that into a cache), so the consumer's share of the work can be timed and its FLOPs counted apart from the
producer's. `transfer` chains the two, which makes each method a `KVTransfer` for the fidelity runner, whose model
argument is the consumer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Cache

from ..arch import ModelHandle
from ..artifacts import SCDArtifacts
from ..cache import SCDCache
from ..codec import apply_rotary
from ..payload import SCDPayload
from .baselines import _RoundTripTransfer, position_ids_from_mask, prefill, rebuild_cache


@dataclass
class Shipment:
    """What crossed the wire for one batch of prefixes, and its size."""

    content: object
    nbytes: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None


class PairTransfer:
    """A way to move a prefix prefilled by `producer` to a consumer with other weights."""

    name: str

    def __init__(self, producer: torch.nn.Module):
        self.producer = producer

    def send(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Shipment:
        raise NotImplementedError

    def receive(self, consumer: torch.nn.Module, shipment: Shipment) -> Cache:
        raise NotImplementedError

    @torch.inference_mode()
    def transfer(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[Cache, int]:
        shipment = self.send(input_ids, attention_mask)
        return self.receive(model, shipment), shipment.nbytes


class Recompute(PairTransfer):
    """The oracle: ship token ids only; the consumer prefills the prefix itself."""

    name = "oracle"

    def send(self, input_ids, attention_mask):
        return Shipment(None, 0, input_ids, attention_mask)

    def receive(self, consumer, shipment):
        return prefill(consumer, shipment.input_ids, shipment.attention_mask)


class ProducerKV(PairTransfer):
    """The producer's own K/V handed to the consumer, raw or through a quantizing baseline ("naive reuse")."""

    def __init__(self, producer: torch.nn.Module, coder: _RoundTripTransfer):
        super().__init__(producer)
        self.coder = coder
        self.name = f"reuse-{coder.name}"

    def send(self, input_ids, attention_mask):
        cache = prefill(self.producer, input_ids, attention_mask)
        layers, nbytes = self.coder.roundtrip_layers(cache, attention_mask)
        return Shipment(layers, nbytes, input_ids, attention_mask)

    def receive(self, consumer, shipment):
        return rebuild_cache(consumer, shipment.content)


class SelectiveRecompute(PairTransfer):
    """DroidSpeak-style: raw BF16 K/V for most layers; for the `layers` where reuse hurts most, the producer ships its
    residual stream (BF16) and the consumer recomputes K/V with its own norm, projections and rotary embedding."""

    def __init__(self, producer: torch.nn.Module, layers: list[int]):
        super().__init__(producer)
        self.layers = sorted(layers)
        self.name = f"droidspeak-{len(layers)}"

    def send(self, input_ids, attention_mask):
        handle = ModelHandle(self.producer)
        residual = {}

        def keep(layer):
            def hook(_module, args, kwargs):
                residual[layer] = kwargs.get("hidden_states", args[0] if args else None).to(torch.bfloat16)

            return hook

        hooks = [handle.layers[layer].register_forward_pre_hook(keep(layer), with_kwargs=True) for layer in self.layers]
        try:
            cache = prefill(self.producer, input_ids, attention_mask)
        finally:
            for hook in hooks:
                hook.remove()
        real = input_ids.numel() if attention_mask is None else int(attention_mask.sum())
        layers, nbytes = [], 0
        for index, layer in enumerate(cache.layers):
            if index in residual:
                layers.append(residual[index])
                nbytes += real * residual[index].shape[-1] * 2
            else:
                layers.append((layer.keys.to(torch.bfloat16), layer.values.to(torch.bfloat16)))
                nbytes += real * layer.keys.shape[1] * layer.keys.shape[-1] * 2 * 2
        return Shipment(layers, nbytes, input_ids, attention_mask)

    def receive(self, consumer, shipment):
        handle = ModelHandle(consumer)
        dtype = next(consumer.parameters()).dtype
        mask = shipment.attention_mask
        positions = (
            position_ids_from_mask(mask)
            if mask is not None
            else torch.arange(shipment.input_ids.shape[1], device=shipment.input_ids.device)[None]
        )
        cos, sin = handle.rotary_cos_sin(positions.expand(shipment.input_ids.shape[0], -1), dtype)
        layers = []
        for index, part in enumerate(shipment.content):
            if isinstance(part, tuple):
                layers.append(tuple(t.to(dtype) for t in part))
                continue
            attention = handle.attention(index)
            hidden = handle.layers[index].input_layernorm(part.to(dtype))
            batch, seq = hidden.shape[:2]
            heads, dim = handle.shape.num_kv_heads, handle.shape.head_dim
            keys = attention.k_proj(hidden).reshape(batch, seq, heads, dim).transpose(1, 2)
            values = attention.v_proj(hidden).reshape(batch, seq, heads, dim).transpose(1, 2)
            layers.append((apply_rotary(keys, cos[:, None], sin[:, None]).to(dtype), values))
        return rebuild_cache(consumer, layers)


class SCDPairTransfer(PairTransfer):
    """SCD across the pair at one operating point: the real path, serialized payload and all."""

    def __init__(self, producer: torch.nn.Module, artifacts: SCDArtifacts, point: str):
        super().__init__(producer)
        self.artifacts = artifacts
        self.point = artifacts.point(point).name
        self.name = f"scd-{self.point}"

    def send(self, input_ids, attention_mask):
        cache = prefill(
            self.producer, input_ids, attention_mask, SCDCache(self.artifacts, self.producer, point=self.point)
        )
        blob = cache.encode().to_bytes()
        return Shipment(blob, len(blob), input_ids, attention_mask)

    def receive(self, consumer, shipment):
        return SCDCache.from_payload(SCDPayload.from_bytes(shipment.content), self.artifacts, consumer)


@dataclass
class ConsumerCost:
    """The consumer's work to get a usable cache: seconds (median of runs) and FLOPs."""

    seconds: float
    flops: int


@torch.inference_mode()
def consumer_cost(
    method: PairTransfer, consumer: torch.nn.Module, input_ids: torch.Tensor, runs: int = 3
) -> ConsumerCost:
    """Time and count the FLOPs of `method.receive` alone, for one shipment of `input_ids`."""
    shipment = method.send(input_ids, None)
    with FlopCounterMode(display=False) as counter:
        method.receive(consumer, shipment)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        method.receive(consumer, shipment)
        times.append(time.perf_counter() - start)
    return ConsumerCost(sorted(times)[runs // 2], counter.get_total_flops())


def critical_layers(artifacts: SCDArtifacts, count: int) -> list[int]:
    """The `count` layers where handing over the producer's raw K/V costs most, per the pair's calibration."""
    report = artifacts.config["calibration"]["layers"]
    return sorted(row["layer"] for row in sorted(report, key=lambda row: -row["naive"])[:count])
