"""Patch layers of a cross-variant plan: the consumer recomputes K/V from the producer's attention input.

Reused K/V drift further from what the consumer would compute the deeper the layer, because every earlier layer of
the two models already differs. At a Patch layer the producer instead ships a code of its normalised attention input
(the input RMSNorm's output); the code's decoder is a linear prediction of the *consumer's* normalised input, an
`Aligner` (small residual MLP) corrects what a linear map cannot (where calibration found that it does), and the
consumer runs its own `k_proj`/`v_proj` and rotary embedding on the result. The hidden code is an ordinary
`TransformCode` with one "head" of the model width.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .codec import decode_vectors, encode_vectors, rotated_keys, scatter_rows
from .codes import LayerCodes, TransformCode


@dataclass
class Aligner:
    """x + W_out gelu(W_in x + b_in) + b_out: maps the linearly predicted consumer input to the consumer's own.

    w_in (D, hidden), b_in (hidden,), w_out (hidden, D), b_out (D,).
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x + nn.functional.gelu(x @ self.w_in + self.b_in) @ self.w_out + self.b_out

    def to(self, device: torch.device | str) -> Aligner:
        return Aligner(*(getattr(self, f.name).to(device) for f in fields(self)))


def encode_patch_layer(
    hidden: torch.Tensor, coded_rows: torch.Tensor, code: TransformCode, kv_shape: tuple[int, int]
) -> LayerCodes:
    """Normalised attention input (batch, seq, D) of one layer -> codes of tokens `coded_rows` (flat in batch*seq).

    The layer's K/V parts are zero-width; `kv_shape` (kv_heads, head_dim) shapes its (empty) exact-token tensors.
    """
    rows = hidden.reshape(-1, 1, hidden.shape[-1])[coded_rows]
    codes, scales = encode_vectors(code, rows)
    empty = torch.empty(coded_rows.numel(), 0, dtype=torch.uint8, device=hidden.device)
    no_exact = torch.empty(0, *kv_shape, dtype=torch.bfloat16, device=hidden.device)
    return LayerCodes(empty, empty, empty, empty, no_exact, no_exact, codes, scales)


def decode_patch_layer(
    codes: LayerCodes,
    cos: torch.Tensor,
    sin: torch.Tensor,
    coded_rows: torch.Tensor,
    code: TransformCode,
    aligner: Aligner | None,
    attention: nn.Module,
    shape: tuple[int, int],
    kv_shape: tuple[int, int],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden codes -> the consumer's keys and values (batch, H, seq, d) for one layer, through its own projections
    and rotary (cos, sin) (batch*seq, d); no `aligner` keeps the linear prediction. Rows not in `coded_rows` come
    back as zeros."""
    batch, seq = shape
    heads, dim = kv_shape
    predicted = decode_vectors(code, codes.hidden_codes, codes.hidden_scales)[:, 0]
    if aligner is not None:
        predicted = aligner(predicted)
    weight_dtype = attention.k_proj.weight.dtype
    keys_in = attention.k_proj(predicted.to(weight_dtype)).float().reshape(-1, heads, dim)
    values_in = attention.v_proj(predicted.to(weight_dtype)).float().reshape(-1, heads, dim)
    device = codes.hidden_codes.device
    keys = torch.zeros(batch, heads, seq, dim, dtype=dtype, device=device)
    values = torch.zeros_like(keys)
    scatter_rows(keys, coded_rows, rotated_keys(keys_in, cos, sin, coded_rows))
    scatter_rows(values, coded_rows, values_in)
    return keys, values
