"""Collect what calibration fits on: pre-RoPE keys and values, as running moments plus a token sample, and the
energy of the queries that will read the keys.

Pre-RoPE keys are exactly the output of `k_proj` (bias included), so forward hooks on `k_proj`/`v_proj` read the
content-space keys directly, with no rotary embedding involved. The first tokens of each document are left out:
they ship exactly (the attention sink) and their outsized norms would skew the fit.
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
        if x.shape[0] == 0:
            return
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


@dataclass
class QueryEnergy:
    """Running mean of squared pre-RoPE queries per dimension, summed over the query heads of each KV head."""

    kv_heads: int
    dim: int
    count: int = 0
    total: torch.Tensor | None = None

    def add(self, q: torch.Tensor) -> None:
        q = q.reshape(-1, self.kv_heads, q.shape[-1] // (self.kv_heads * self.dim), self.dim).double()
        energy = q.pow(2).sum((0, 2))
        self.total = energy if self.total is None else self.total + energy
        self.count += q.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / self.count


@torch.inference_mode()
def collect_kv_moments(
    model: torch.nn.Module,
    documents: list[list[int]],
    keep_every: int = 4,
    skip_tokens: int = 0,
    progress: bool = True,
) -> tuple[dict[tuple[int, str], KVMoments], dict[int, QueryEnergy]]:
    """Run each document (a list of token ids) through the model; gather K/V moments and query energy per layer,
    leaving out each document's first `skip_tokens` tokens."""
    handle = ModelHandle(model)
    shape = handle.shape
    moments = {
        (layer, kind): KVMoments(shape.num_kv_heads, shape.head_dim)
        for layer in range(shape.num_layers)
        for kind in KINDS
    }
    queries = {layer: QueryEnergy(shape.num_kv_heads, shape.head_dim) for layer in range(shape.num_layers)}
    hooks = []
    for layer in range(shape.num_layers):
        attention = handle.attention(layer)
        for kind, proj in (("k", attention.k_proj), ("v", attention.v_proj)):
            target = moments[(layer, kind)]
            hooks.append(
                proj.register_forward_hook(lambda _m, _i, out, t=target: t.add(out[:, skip_tokens:], keep_every))
            )
        hooks.append(
            attention.q_proj.register_forward_hook(lambda _m, _i, out, t=queries[layer]: t.add(out[:, skip_tokens:]))
        )
    device = next(model.parameters()).device
    try:
        for doc in tqdm(documents, desc="collecting K/V", disable=not progress):
            model(torch.tensor([doc], device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return moments, queries
