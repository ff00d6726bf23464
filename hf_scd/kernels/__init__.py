"""Triton kernels for the codec's hot paths: `encode_rows` and `decode_rows` on CUDA tensors.

`hf_scd.codec` is the reference; these functions have exactly its signatures, and `hf_scd.backend` calls them
instead of it for CUDA tensors of units that `covers` accepts. Two paths behind them:
- fused (`encode.py`, `decode.py`): units of one layer coded per head, one kernel pass per (tokens, head, layer);
- blocks (`blocks.py`): units of any one shape, joint units of several layers included: batched matrix products
  between gather, quantize, dequantize and scatter kernels.
Nothing heavy is imported here, so `available()` and `covers()` answer cheaply on machines without Triton or a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from hf_scd.codes import CoderPair, LayerCodes, RowCodes

__all__ = ["available", "covers", "decode_rows", "encode_rows"]


def available() -> bool:
    """True iff Triton imports and a CUDA device is present: the codec only dispatches here then."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available()


def _fused(units: Sequence[Sequence[torch.Tensor]], coders: Sequence[CoderPair]) -> bool:
    """Units of one layer, coded per head: the fused kernels' case."""
    _, heads, _, dim = units[0][0].shape
    one_layer = all(len(unit) == 1 for unit in units)
    return one_layer and all(tuple(code.mean.shape) == (heads, dim) for pair in coders for code in pair)


def covers(units: Sequence[Sequence[torch.Tensor]], coders: Sequence[CoderPair]) -> bool:
    """Whether the kernels code these units (each its member layers' (batch, H, seq, d) tensors) with these
    coders: a power-of-two head_dim of at least 32, and all units of one member count and coder shape, blocks
    made of whole heads."""
    _, heads, _, dim = units[0][0].shape
    members = len(units[0])
    shapes = {tuple(code.mean.shape) for pair in coders for code in pair}
    if dim < 32 or dim & (dim - 1) or len(shapes) != 1 or any(len(unit) != members for unit in units):
        return False
    blocks, width = shapes.pop()
    return blocks * width == members * heads * dim and width % dim == 0


def encode_rows(
    keys: Sequence[Sequence[torch.Tensor]],
    values: Sequence[Sequence[torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
) -> list[RowCodes]:
    """`hf_scd.codec.encode_rows` on the fused kernels or the block path; see `covers`."""
    if _fused(keys, coders):
        from .encode import encode_rows
    else:
        from .blocks import encode_rows
    return encode_rows(keys, values, cos, sin, rows, coders)


def decode_rows(
    codes: Sequence[LayerCodes],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    coders: Sequence[CoderPair],
    out_keys: Sequence[Sequence[torch.Tensor]],
    out_values: Sequence[Sequence[torch.Tensor]],
) -> None:
    """`hf_scd.codec.decode_rows` on the fused kernels or the block path; see `covers`."""
    if _fused(out_keys, coders):
        from .decode import decode_rows
    else:
        from .blocks import decode_rows
    decode_rows(codes, cos, sin, rows, coders, out_keys, out_values)
