"""Prefill: the model computes a prefix's cache itself. The oracle every transfer is measured against, and what a
consumer falls back to when a transfer fails."""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache

from .compat import with_cache


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, as ``generate()`` computes them, so a shipped prefix lines up with its suffix."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None = None) -> Cache:
    """The model's cache (a fresh ``DynamicCache`` unless given) after one forward over ``input_ids``."""
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
