"""Copies of a model with other weights, to measure what the fit probe (`hf_scd.probe`) accepts and refuses: the same
model requantized (another precision of it), or with some layers' weights replaced by noise (a model the codes of its
artifacts no longer fit)."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def requantized(model: nn.Module, bits: int = 8, block: int | None = None) -> nn.Module:
    """A copy of `model` whose weight matrices went through `bits`-bit quantization and back to their dtype.

    `block=None`: symmetric, one scale per row (int8 per-channel, as common int8 checkpoints store them); a block size:
    asymmetric, a scale and a minimum per `block` consecutive weights of a row (as GGUF's Q4_1 stores them). Norms and
    biases stay as they are."""
    copied = copy.deepcopy(model)
    for param in copied.parameters():
        if param.ndim != 2:
            continue
        weight = param.float()
        if block is None:
            levels = 2 ** (bits - 1) - 1
            scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / levels
            restored = (weight / scale).round().clamp(-levels, levels) * scale
        else:
            if weight.shape[1] % block:
                raise ValueError(f"a row of {weight.shape[1]} weights does not split into blocks of {block}")
            rows = weight.reshape(-1, block)
            low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
            scale = ((high - low) / (2**bits - 1)).clamp(min=1e-12)
            restored = (((rows - low) / scale).round().clamp(0, 2**bits - 1) * scale + low).reshape(weight.shape)
        param.copy_(restored)
    return copied


@torch.no_grad()
def scrambled(model: nn.Module, layers: tuple[int, ...], seed: int = 0) -> nn.Module:
    """A copy of `model` whose decoder `layers` have every weight matrix replaced by Gaussian noise of its own
    standard deviation: those layers compute nothing the artifacts were fitted on."""
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        for param in copied.model.layers[layer].parameters():
            if param.ndim == 2:
                noise = torch.randn(param.shape, generator=generator) * param.float().std()
                param.copy_(noise)
    return copied
