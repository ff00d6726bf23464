"""KV-transfer baselines that SCD must beat: ship the cache raw, in int8, or KIVI-quantized.

Each baseline prefills on the producer, quantizes and dequantizes every layer's post-RoPE keys and
values exactly as a receiver would see them, and reports the bytes its packed codes plus fp16
scales/zeros would take on the wire. Only real tokens count: left padding is neither shipped nor
quantized (it is zeroed, and masked out anyway).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from transformers import Cache, DynamicCache

from ..compat import with_cache

FP16_BYTES = 2


@runtime_checkable
class KVTransfer(Protocol):
    """A way to move a prefilled KV cache from a producer to a consumer."""

    name: str

    def transfer(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[Cache, int]:
        """Prefill input_ids on the producer model, 'ship' the cache, return the consumer's cache and the number of
        bytes that would cross the wire for the KV data."""
        ...


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, as ``generate()`` computes them, so a shipped prefix lines up with its suffix."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None = None) -> Cache:
    """The producer's cache (a fresh ``DynamicCache`` unless given) after one forward over ``input_ids``."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    position_ids = None if attention_mask is None else position_ids_from_mask(attention_mask)
    model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **with_cache(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return cache


def rebuild_cache(model, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A fresh consumer cache holding the given (keys, values) per layer."""
    cache = DynamicCache(config=model.config)
    for layer_idx, (keys, values) in enumerate(layers):
        cache.update(keys, values, layer_idx)
    return cache


class _RoundTripTransfer:
    """Shared plumbing: prefill, apply ``_roundtrip`` to each row's real tokens, rebuild, count bytes."""

    name: str

    def _roundtrip(self, x: torch.Tensor, is_key: bool) -> tuple[torch.Tensor, int]:
        """Dequantized x (heads, tokens, head_dim) in float32 and its packed size in bytes."""
        raise NotImplementedError

    def transfer(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[DynamicCache, int]:
        with torch.inference_mode():
            return self.ship(model, prefill(model, input_ids, attention_mask), attention_mask)

    def ship(self, model, producer: DynamicCache, attention_mask: torch.Tensor | None) -> tuple[DynamicCache, int]:
        """The consumer's cache and wire bytes for an already prefilled producer cache (it is left untouched)."""
        layers, total = self.roundtrip_layers(producer, attention_mask)
        return rebuild_cache(model, layers), total

    def roundtrip_layers(
        self, producer: DynamicCache, attention_mask: torch.Tensor | None
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Every layer's (keys, values) as the receiver dequantizes them, and the wire bytes."""
        layers, total = [], 0
        for layer in producer.layers:
            shipped = []
            for tensor, is_key in ((layer.keys, True), (layer.values, False)):
                out = torch.zeros_like(tensor)
                for row in range(tensor.shape[0]):
                    real = slice(None) if attention_mask is None else attention_mask[row].bool()
                    x, nbytes = self._roundtrip(tensor[row][:, real].float(), is_key)
                    out[row][:, real] = x.to(tensor.dtype)
                    total += nbytes
                shipped.append(out)
            layers.append((shipped[0], shipped[1]))
        return layers, total


class RawKV(_RoundTripTransfer):
    """The cache shipped as bf16, 2 bytes per element: lossless for a bf16 model."""

    name = "bf16"

    def _roundtrip(self, x: torch.Tensor, is_key: bool) -> tuple[torch.Tensor, int]:
        return x.to(torch.bfloat16).float(), x.numel() * 2


class Int8KV(_RoundTripTransfer):
    """Symmetric int8 with one fp16 absmax scale per token and KV head."""

    name = "int8"

    def _roundtrip(self, x: torch.Tensor, is_key: bool) -> tuple[torch.Tensor, int]:
        scale = (x.abs().amax(-1, keepdim=True) / 127).half().float()
        codes = (x / torch.where(scale > 0, scale, torch.ones_like(scale))).round().clamp(-127, 127)
        return codes * scale, x.numel() + scale.numel() * FP16_BYTES


def _asymmetric_groups(x: torch.Tensor, dim: int, group_size: int, bits: int) -> tuple[torch.Tensor, int]:
    """Min/max quantize x in consecutive groups of ``group_size`` along ``dim`` (the last group may be shorter).

    Returns the dequantized tensor and the bytes of bit-packed codes plus an fp16 scale and zero per group.
    """
    levels = 2**bits - 1
    pieces, groups = [], 0
    for chunk in torch.split(x, group_size, dim=dim):
        low = chunk.amin(dim, keepdim=True).half().float()
        scale = ((chunk.amax(dim, keepdim=True) - low) / levels).half().float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = ((chunk - low) / safe).round().clamp(0, levels)
        pieces.append(codes * scale + low)
        groups += low.numel()
    return torch.cat(pieces, dim=dim), math.ceil(x.numel() * bits / 8) + groups * 2 * FP16_BYTES


class KIVI(_RoundTripTransfer):
    """KIVI (Liu et al., 2024): keys per channel over groups of tokens, values per token over groups of channels.

    Keys carry channel-wise outliers, so each channel gets its own range within a token group; values
    mix channels in attention output, so per-token ranges suit them. Unlike KIVI we keep no fp16
    residual window: a trailing run of fewer than ``group_size`` tokens is quantized per channel over
    that shorter group, so every token is shipped at ``bits`` bits.
    """

    def __init__(self, bits: int = 4, group_size: int = 32) -> None:
        self.bits, self.group_size = bits, group_size
        self.name = f"kivi-int{bits}"

    def _roundtrip(self, x: torch.Tensor, is_key: bool) -> tuple[torch.Tensor, int]:
        return _asymmetric_groups(x, dim=-2 if is_key else -1, group_size=self.group_size, bits=self.bits)
