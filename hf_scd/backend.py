"""Codes all Reuse units of a cache at once, on the Triton kernels for CUDA tensors and the torch reference
(`codec.py`) otherwise. The only module that imports the kernels: the choice between the two is made here alone.

The kernels code units of one layer per head in one fused pass, and units of any one shape (joint units of several
layers) with batched matrix products between their kernels (`hf_scd.kernels`); others take the reference. On a CPU
that multiplies bf16 natively (AMX or AVX512-BF16) the reference runs its products in bf16 (`products`): 10-20x
faster than float32 there, and the rounding it adds (2^-9 of each coefficient) is under 2% of the quantization noise
of even an 8-bit component.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, partial

import torch

from . import codec
from .codes import CoderPair, LayerCodes, RowCodes

KV = tuple[torch.Tensor, torch.Tensor]


def _row_coder(
    reference, x: torch.Tensor, rows: torch.Tensor, units: Sequence[Sequence], coders: Sequence[CoderPair], **options
):
    """The Triton kernels standing in for `reference` (`encode_rows` / `decode_rows`) on CUDA tensors (x, a layer's
    (batch, H, seq, d)) of units they cover (`kernels.covers`), else itself with `options`; itself too when there are
    no `rows` to code (every token exact)."""
    if x.is_cuda and rows.numel():
        from . import kernels  # nothing heavy: hf_scd.kernels imports triton only when a kernel is called

        if kernels.available() and kernels.covers(units, coders):
            return getattr(kernels, reference.__name__)
    return partial(reference, products=products(x.device), **options)


def products(device: torch.device) -> torch.dtype:
    """The dtype the reference's encoder and decoder products run in on `device`: bf16 on a CPU with native bf16
    matmuls, float32 elsewhere (CUDA tensors the kernels do not cover, CPUs that would emulate bf16)."""
    if device.type == "cpu" and _cpu_multiplies_bf16():
        return torch.bfloat16
    return torch.float32


@cache
def _cpu_multiplies_bf16() -> bool:
    """AMX or AVX512-BF16, as torch's own (private) CPU checks report them; a torch without them gets float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def code_units(
    keys: Sequence[Sequence[torch.Tensor]],
    values: Sequence[Sequence[torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    coded_rows: torch.Tensor,
    coders: Sequence[CoderPair],
    packed: bool = True,
) -> list[RowCodes]:
    """Units' member layers' caches (batch, H, seq, d), rotary (batch*seq, d) -> per unit, the codes of its
    `coded_rows` (flat into batch*seq): on CUDA tensors of per-head units one Triton launch for all keys and one for
    all values. With `packed=False` the reference gives the rows the decoder reads instead of packed bytes, for
    codes that are decoded or entropy-coded next (the kernels' codes come packed either way)."""
    if not keys:
        return []
    coder = _row_coder(codec.encode_rows, keys[0][0], coded_rows, keys, coders, packed=packed)
    return coder(keys, values, cos, sin, coded_rows, coders)


def encode_units(
    keys: Sequence[Sequence[torch.Tensor]],
    values: Sequence[Sequence[torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    coded_rows: torch.Tensor,
    exact_rows: torch.Tensor,
    coders: Sequence[CoderPair],
    packed: bool = True,
) -> list[list[LayerCodes]]:
    """Units' member layers' caches -> per unit, one `LayerCodes` per member: bf16 `exact_rows` in each, the unit's
    codes (`code_units`, packed or not) in its last and zero-width codes in the others. Padding is in neither set of
    rows."""
    coded = code_units(keys, values, cos, sin, coded_rows, coders, packed)
    return [
        [
            layer_codes(
                k, v, cos, sin, coded_rows, exact_rows, *((codes, pair) if member == len(unit_keys) - 1 else ())
            )
            for member, (k, v) in enumerate(zip(unit_keys, unit_values, strict=True))
        ]
        for unit_keys, unit_values, codes, pair in zip(keys, values, coded, coders, strict=True)
    ]


def layer_codes(
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    coded_rows: torch.Tensor,
    exact_rows: torch.Tensor,
    codes: RowCodes | None = None,
    coders: CoderPair | None = None,
) -> LayerCodes:
    """What one layer of a unit puts on the wire: its exact `exact_rows` in bf16 (keys de-rotated), and the unit's
    `codes` (`code_units`, by the unit's `coders`) if it is the unit's last layer, else zero-width codes for its
    `coded_rows`. Codes given as rows (`code_units` with `packed=False`) are held so (`UnpackedLayerCodes`)."""
    exact_keys = codec.content_keys(codec.flat_rows(keys, exact_rows), cos, sin, exact_rows).to(torch.bfloat16)
    exact_values = codec.flat_rows(values, exact_rows).to(torch.bfloat16)
    empty = torch.empty(coded_rows.numel(), 0, dtype=torch.uint8, device=keys.device)
    key_codes, key_scales, value_codes, value_scales = codes or (empty, empty, empty, empty)
    if key_codes.ndim == 2:  # packed bytes (tokens, bytes), or no codes
        return LayerCodes(key_codes, key_scales, value_codes, value_scales, exact_keys, exact_values, empty, empty)
    layer = LayerCodes(empty, key_scales, empty, value_scales, exact_keys, exact_values, empty, empty)
    return codec.UnpackedLayerCodes(layer, coders, key_codes, value_codes)


def decode_units(
    members: Sequence[Sequence[LayerCodes]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    coded_rows: torch.Tensor,
    exact_rows: torch.Tensor,
    coders: Sequence[CoderPair],
    kv_shape: tuple[int, int],
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> list[list[KV]]:
    """Units' member layers' `LayerCodes` (the unit's codes in its last, the exact sink in each) -> per unit, per
    member, keys and values (batch, H, seq, d) in `dtype`, keys re-rotated with the given (cos, sin).

    `shape` is (batch, seq), `kv_shape` (H, d). Padding rows come back as zeros: attention masks them anyway. All
    units are decoded together, into one allocation: on CUDA tensors of per-head units one Triton launch for all keys
    and one for all values.
    """
    if not members:
        return []
    codes = [unit[-1] for unit in members]
    batch, seq = shape
    heads, dim = kv_shape
    device = codes[0].key_scales.device
    layers = sum(map(len, members))
    covered = coded_rows.numel() + exact_rows.numel() == batch * seq
    out = (torch.empty if covered else torch.zeros)(2, layers, batch, heads, seq, dim, dtype=dtype, device=device)
    keys, values = out.unbind(0)
    sizes = [len(unit) for unit in members]
    unit_keys = [list(part.unbind(0)) for part in keys.split(sizes)]
    unit_values = [list(part.unbind(0)) for part in values.split(sizes)]
    _row_coder(codec.decode_rows, unit_keys[0][0], coded_rows, unit_keys, coders)(
        codes, cos, sin, coded_rows, coders, unit_keys, unit_values
    )
    if exact_rows.numel():
        every = [layer for unit in members for layer in unit]
        exact_keys = torch.stack([layer.exact_keys for layer in every])
        codec.scatter_rows(keys, exact_rows, codec.rotated_keys(exact_keys, cos, sin, exact_rows))
        codec.scatter_rows(values, exact_rows, torch.stack([layer.exact_values for layer in every]))
    return [list(zip(k, v, strict=True)) for k, v in zip(unit_keys, unit_values, strict=True)]
