"""The producer's own K/V shipped to the consumer: raw bf16, int8 or KIVI-quantized ("naive reuse" across a pair).

Each coder quantizes and dequantizes every layer's post-RoPE keys and values exactly as a receiver would see them, and
counts the bytes its packed codes plus fp16 scales/zeros would take on the wire. Only real tokens count: left padding
is neither shipped nor quantized (it is zeroed, and masked out anyway). `ProducerKV` is the transfer method that ships
a cache through a coder (these here, or KVTC in `kvtc.py`); on the same model it is the round-trip baseline SCD must
beat.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from transformers import DynamicCache

from ..prefill import prefill
from .transfer import Shipment, Transfer, rebuild_cache

FP16_BYTES = 2


class KVCoder(ABC):
    """A wire format for a whole cache's K/V."""

    name: str

    @abstractmethod
    def roundtrip_layers(
        self, cache: DynamicCache, attention_mask: torch.Tensor | None
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Every layer's (keys, values) as the receiver dequantizes them, and the wire bytes; `cache` is untouched."""


class RowCoder(KVCoder):
    """A wire format defined by how it round-trips one row's keys or values of one layer on their own."""

    @abstractmethod
    def _roundtrip(self, x: torch.Tensor, is_key: bool) -> tuple[torch.Tensor, int]:
        """Dequantized x (heads, tokens, head_dim) in float32 and its packed size in bytes."""

    def roundtrip_layers(
        self, cache: DynamicCache, attention_mask: torch.Tensor | None
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        layers, total = [], 0
        for layer in cache.layers:
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


class ProducerKV(Transfer):
    """The producer's prefilled K/V through `coder`, rebuilt as the consumer's cache; named after the coder unless
    `name` says otherwise (a cross-variant eval calls it "reuse-<coder>")."""

    def __init__(self, producer: torch.nn.Module, coder: KVCoder, name: str | None = None):
        super().__init__(producer)
        self.coder = coder
        self.name = coder.name if name is None else name

    def send(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Shipment:
        layers, nbytes = self.coder.roundtrip_layers(prefill(self.producer, input_ids, attention_mask), attention_mask)
        return Shipment(layers, nbytes, input_ids, attention_mask)

    def receive(self, consumer: torch.nn.Module, shipment: Shipment) -> DynamicCache:
        return rebuild_cache(consumer, shipment.content)


class RawKV(RowCoder):
    """The cache shipped as bf16, 2 bytes per element: lossless for a bf16 model."""

    name = "bf16"

    def _roundtrip(self, x: torch.Tensor, is_key: bool) -> tuple[torch.Tensor, int]:
        return x.to(torch.bfloat16).float(), x.numel() * 2


class Int8KV(RowCoder):
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


class KIVI(RowCoder):
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
