"""Codes all Reuse layers of a cache at once, on the Triton kernels for CUDA tensors and the torch reference
(`codec.py`) otherwise. The only module that imports the kernels: the choice between the two is made here alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import codec
from .codes import CoderPair, LayerCodes


def _row_coder(reference, x: torch.Tensor, rows: torch.Tensor):
    """The Triton kernel standing in for `reference` (`encode_rows` / `decode_rows`) on CUDA tensors, else itself;
    itself too when there are no `rows` to code (every token exact), which needs no launch."""
    if x.is_cuda and rows.numel():
        from . import kernels  # hf_scd.kernels: imports triton, so only when a CUDA tensor is coded

        if kernels.available():
            return getattr(kernels, reference.__name__)
    return reference


def encode_layers(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    coded_rows: torch.Tensor,
    exact_rows: torch.Tensor,
    coders: Sequence[CoderPair],
) -> list[LayerCodes]:
    """Layers' caches (batch, H, seq, d), rotary (batch*seq, d) -> per layer, codes of `coded_rows` and bf16
    `exact_rows`.

    Row indices are flat into batch*seq; padding is in neither. All layers are coded together: on CUDA tensors that
    is one Triton launch for all keys and one for all values.
    """
    if not keys:
        return []
    coded = _row_coder(codec.encode_rows, keys[0], coded_rows)(keys, values, cos, sin, coded_rows, coders)
    exact_keys = codec.content_keys(torch.stack([codec.flat_rows(k, exact_rows) for k in keys]), cos, sin, exact_rows)
    exact_values = torch.stack([codec.flat_rows(v, exact_rows) for v in values])
    exact_keys, exact_values = exact_keys.to(torch.bfloat16), exact_values.to(torch.bfloat16)
    no_hidden = torch.empty(coded_rows.numel(), 0, dtype=torch.uint8, device=keys[0].device)
    return [
        LayerCodes(*layer, k, v, no_hidden, no_hidden)
        for layer, k, v in zip(coded, exact_keys, exact_values, strict=True)
    ]


def decode_layers(
    codes: Sequence[LayerCodes],
    cos: torch.Tensor,
    sin: torch.Tensor,
    coded_rows: torch.Tensor,
    exact_rows: torch.Tensor,
    coders: Sequence[CoderPair],
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Layers' codes -> per layer, keys and values (batch, H, seq, d) in `dtype`, keys re-rotated with the given
    (cos, sin).

    `shape` is (batch, seq). Padding rows come back as zeros: attention masks them anyway. All layers are decoded
    together, into one allocation: on CUDA tensors one Triton launch for all keys and one for all values.
    """
    if not codes:
        return []
    batch, seq = shape
    heads, _, dim = coders[0][0].decoder.shape
    device = codes[0].key_codes.device
    covered = coded_rows.numel() + exact_rows.numel() == batch * seq
    out = (torch.empty if covered else torch.zeros)(2, len(codes), batch, heads, seq, dim, dtype=dtype, device=device)
    keys, values = out.unbind(0)
    _row_coder(codec.decode_rows, keys, coded_rows)(
        codes, cos, sin, coded_rows, coders, keys.unbind(0), values.unbind(0)
    )
    if exact_rows.numel():
        exact_keys = torch.stack([layer.exact_keys for layer in codes])
        codec.scatter_rows(keys, exact_rows, codec.rotated_keys(exact_keys, cos, sin, exact_rows))
        codec.scatter_rows(values, exact_rows, torch.stack([layer.exact_values for layer in codes]))
    return list(zip(keys.unbind(0), values.unbind(0), strict=True))
