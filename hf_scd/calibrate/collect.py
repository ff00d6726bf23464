"""Collect what calibration fits on: pre-RoPE keys and values of every Reuse unit, as running moments plus a token
sample, and the energy of the queries that will read the keys.

Pre-RoPE keys are exactly the output of `k_proj` (bias included), so forward hooks on `k_proj`/`v_proj` read the
content-space keys directly, with no rotary embedding involved. The first tokens of each document are left out:
they ship exactly (the attention sink) and their outsized norms would skew the fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..arch import ModelHandle
from ..schema import KINDS


@dataclass
class KVMoments:
    """Running first and second moments (float64) of one unit's K or V per block, and a sample of tokens."""

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

    def hold_out(self, fraction: float) -> tuple[KVMoments, torch.Tensor]:
        """(these moments without the last `fraction` of the sample's rows, those rows): a held-out set that a fit
        on the returned moments never saw. The sample runs in document order, so the rows are the last documents'."""
        sample = self.samples()
        split = int((1 - fraction) * sample.shape[0])
        held = sample[split:].double()
        outer = self.outer - torch.einsum("nhd,nhe->hde", held, held)
        kept = KVMoments(self.heads, self.dim, self.count - held.shape[0], self.total - held.sum(0), outer)
        kept.sample.append(sample[:split])
        return kept, sample[split:]


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


def _activations(
    model: torch.nn.Module, doc: list[int], skip_tokens: int, hidden_layers: tuple[int, ...]
) -> dict[tuple[int, str], torch.Tensor]:
    """One forward over `doc`: per (layer, kind) the tokens' pre-RoPE keys ("k"), values ("v"), pre-RoPE queries
    ("q") and, for `hidden_layers`, normalised attention input ("h"), each (tokens - skip_tokens, width), leaving
    out the first tokens."""
    handle = ModelHandle(model)
    out: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key):
        def hook(_module, _inputs, output):
            out[key] = output[0, skip_tokens:].detach()

        return hook

    def keep_input(key):
        def hook(_module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            out[key] = hidden[0, skip_tokens:].detach()

        return hook

    hooks = []
    for layer in range(handle.shape.num_layers):
        attention = handle.attention(layer)
        for kind, proj in (("k", attention.k_proj), ("v", attention.v_proj), ("q", attention.q_proj)):
            hooks.append(proj.register_forward_hook(keep((layer, kind))))
        if layer in hidden_layers:
            hooks.append(attention.register_forward_pre_hook(keep_input((layer, "h")), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        model(torch.tensor([doc], device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return out


@torch.inference_mode()
def collect_kv_moments(
    model: torch.nn.Module,
    documents: list[list[int]],
    keep_every: int = 4,
    skip_tokens: int = 0,
    progress: bool = True,
    consumer: torch.nn.Module | None = None,
    hidden_layers: tuple[int, ...] = (),
    units: list[tuple[int, ...]] | None = None,
    blocks: tuple[int, int] | None = None,
) -> tuple[dict[tuple[int, str], KVMoments], dict[int, QueryEnergy]]:
    """Run each document (a list of token ids) through the model; gather K/V moments per Reuse unit (keyed (unit,
    kind); `units` lists their member layers, default one per layer) in its coders' `blocks` (count, width; default
    one per head), and query energy per layer, leaving out each document's first `skip_tokens` tokens.

    With a `consumer` (a variant of `model`), moments are of joint [model's; consumer's] vectors per block, the query
    energy is the consumer's, and `hidden_layers` also get joint moments of the normalised attention input (kind
    "h", keyed by layer, one block of the model width).
    """
    shape = ModelHandle(model).shape
    units = units or [(layer,) for layer in range(shape.num_layers)]
    count, width = blocks or (shape.num_kv_heads, shape.head_dim)
    moments: dict[tuple[int, str], KVMoments] = {}
    queries = {layer: QueryEnergy(shape.num_kv_heads, shape.head_dim) for layer in range(shape.num_layers)}
    factor = 1 if consumer is None else 2

    def add(key: tuple[int, str], parts: list[torch.Tensor], reader_parts: list[torch.Tensor], heads: int, dim: int):
        x = torch.cat(parts, -1).reshape(-1, heads, dim)
        if consumer is not None:
            x = torch.cat([x, torch.cat(reader_parts, -1).reshape(-1, heads, dim)], -1)
        moments.setdefault(key, KVMoments(heads, dim * factor)).add(x, keep_every)

    for doc in tqdm(documents, desc="collecting K/V", disable=not progress):
        acts = _activations(model, doc, skip_tokens, hidden_layers)
        reader = acts if consumer is None else _activations(consumer, doc, skip_tokens, hidden_layers)
        for layer in range(shape.num_layers):
            queries[layer].add(reader[(layer, "q")])
        for unit, members in enumerate(units):
            for kind in KINDS:
                parts = [acts[(layer, kind)] for layer in members]
                add((unit, kind), parts, [reader[(layer, kind)] for layer in members], count, width)
        for layer in hidden_layers:
            add((layer, "h"), [acts[(layer, "h")]], [reader[(layer, "h")]], 1, acts[(layer, "h")].shape[-1])
    return moments, queries
