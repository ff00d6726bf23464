"""DroidSpeak-style selective recompute: the cross-variant baseline that recomputes the layers reuse hurts most."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..arch import ModelHandle
from ..artifacts import SCDArtifacts
from ..codec import apply_rotary
from ..prefill import position_ids_from_mask, prefill
from .transfer import Shipment, Transfer, rebuild_cache


class SelectiveRecompute(Transfer):
    """Raw BF16 K/V for most layers; for the `layers` where reuse hurts most, the producer ships its residual stream
    (BF16) and the consumer recomputes K/V with its own norm, projections and rotary embedding."""

    def __init__(self, producer: torch.nn.Module, layers: list[int]):
        super().__init__(producer)
        self.layers = sorted(layers)
        self.name = f"droidspeak-{len(layers)}"

    def send(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Shipment:
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

    def receive(self, consumer: torch.nn.Module, shipment: Shipment) -> DynamicCache:
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


def critical_layers(artifacts: SCDArtifacts, count: int) -> list[int]:
    """The `count` layers where handing over the producer's raw K/V costs most, per the pair's calibration. Its report
    has a row per Reuse unit ("layers", or "layer" in format-4 artifacts); a unit of several layers gives each of them
    an equal share of its error."""
    cost = {}
    for row in artifacts.config.calibration["layers"]:
        members = row["layers"] if "layers" in row else [row["layer"]]
        cost.update({layer: row["naive"] / len(members) for layer in members})
    return sorted(sorted(cost, key=lambda layer: -cost[layer])[:count])
