"""Collect what calibration fits on: pre-RoPE keys and values, as running moments plus a token sample.

Pre-RoPE keys are exactly the output of `k_proj` (bias included), so forward hooks on `k_proj`/`v_proj` read the
content-space keys directly, with no rotary embedding involved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..arch import ModelHandle

KINDS = ("k", "v")


@dataclass
class KVMoments:
    """Running first and second moments (float64) of one layer's K or V per head, and a sample of tokens."""

    heads: int
    dim: int
    count: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    sample: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, keep_every: int) -> None:
        x = x.reshape(-1, self.heads, self.dim).double()
        if self.total is None:
            self.total = torch.zeros(self.heads, self.dim, dtype=torch.float64)
            self.outer = torch.zeros(self.heads, self.dim, self.dim, dtype=torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += torch.einsum("nhd,nhe->hde", x, x)
        self.sample.append(x[::keep_every].float())

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def covariance(self) -> torch.Tensor:
        mean = self.mean()
        return self.outer / self.count - torch.einsum("hd,he->hde", mean, mean)

    def samples(self) -> torch.Tensor:
        return torch.cat(self.sample)


@torch.inference_mode()
def collect_kv_moments(
    model: torch.nn.Module, documents: list[list[int]], keep_every: int = 4, progress: bool = True
) -> dict[tuple[int, str], KVMoments]:
    """Run each document (a list of token ids) through the model and gather K/V moments for every layer."""
    handle = ModelHandle(model)
    shape = handle.shape
    moments = {
        (layer, kind): KVMoments(shape.num_kv_heads, shape.head_dim)
        for layer in range(shape.num_layers)
        for kind in KINDS
    }
    hooks = []
    for layer in range(shape.num_layers):
        attention = handle.attention(layer)
        for kind, proj in (("k", attention.k_proj), ("v", attention.v_proj)):
            target = moments[(layer, kind)]
            hooks.append(proj.register_forward_hook(lambda _m, _i, out, t=target: t.add(out, keep_every)))
    device = next(model.parameters()).device
    try:
        for doc in tqdm(documents, desc="collecting K/V", disable=not progress):
            model(torch.tensor([doc], device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return moments
