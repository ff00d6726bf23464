"""What the encode and decode kernels share at launch: the autotuning space, the grid over (row blocks, heads,
layers), and the per-layer tensors of a cache reached from one base pointer."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from hf_scd.codes import TransformCode

from ._tables import INTERPRET, CodeTables, tables

INTERPRET_BLOCK_T = 16


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the (BLOCK_T, C) fp32 tile at <= 16K elements: bigger ones spill and take minutes to compile."""
    comps = kwargs.get("C", named_args.get("C", 128))
    return [c for c in configs if c.kwargs["BLOCK_T"] * max(comps, 64) <= 16384]


def autotuned(kernel, key: list[str]):
    """`kernel` autotuned over token-block sizes, keyed on the compile-time shape `key`. A block has 16 rows a warp,
    64 a warpgroup, the rows of one Hopper tensor-core instruction: with fewer, Triton gives several warps the same
    rows of a product, and `python -m hf_scd.kernels.aot` counts twice the tensor-core work."""
    configs = [triton.Config({"BLOCK_T": 16 * warps}, num_warps=warps, num_stages=1) for warps in (4, 8)]
    return triton.autotune(configs=configs, prune_configs_by={"early_config_prune": _prune}, key=key)(kernel)


@dataclass
class KernelLaunch:
    """One launch, ready to run: a kernel, its autotuned twin, its arguments and the grid's extent."""

    kernel: triton.JITFunction
    tuned: triton.runtime.Autotuner
    rows: int
    heads: int
    layers: int
    args: tuple
    meta: dict

    def __call__(self) -> None:
        """One program per (block of rows, head, layer); the interpreter runs a single fixed block size, untuned."""
        if INTERPRET:
            grid = (triton.cdiv(self.rows, INTERPRET_BLOCK_T), self.heads, self.layers)
            self.kernel[grid](*self.args, **self.meta, BLOCK_T=INTERPRET_BLOCK_T)
        else:
            self.tuned[lambda m: (triton.cdiv(self.rows, m["BLOCK_T"]), self.heads, self.layers)](
                *self.args, **self.meta
            )


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied only if its last dimension is not contiguous: the kernels index it with stride 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass
class LayerPointers:
    """Per-layer tensors of one dtype and strides, reached by the kernel as `base + offsets[layer]` (elements)."""

    base: torch.Tensor
    offsets: torch.Tensor  # (L,) int64
    align: int  # every layer's start is a multiple of this many elements (16 bytes' worth, else 1)


def layer_pointers(tensors: Sequence[torch.Tensor]) -> LayerPointers | None:
    """Where each of `tensors` starts, relative to the lowest; None unless they share dtype, device and strides
    (their shapes may differ: each layer's codes have their own width) and element-aligned starts."""
    first = tensors[0]
    if any(t.dtype != first.dtype or t.device != first.device or t.stride() != first.stride() for t in tensors):
        return None
    size = first.element_size()
    base = min(tensors, key=lambda t: t.data_ptr())
    deltas = [t.data_ptr() - base.data_ptr() for t in tensors]
    if any(delta % size for delta in deltas):
        return None
    aligned = base.data_ptr() % 16 == 0 and all(delta % 16 == 0 for delta in deltas)
    offsets = _device_offsets(tuple(delta // size for delta in deltas), first.device)
    return LayerPointers(base, offsets, 16 // size if aligned and size <= 16 else 1)


@functools.lru_cache(maxsize=256)
def _device_offsets(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`offsets` as an int64 tensor on `device`, built once: a cache's layers sit at the same offsets from their base
    call after call (one allocation, layer after layer), and a host-to-device copy a launch would cost more than a
    short launch. Read-only: the kernels only load from it."""
    return torch.tensor(offsets, dtype=torch.int64).to(device)


def cache_tables(
    caches: Sequence[torch.Tensor], codes: Sequence[TransformCode], rows: torch.Tensor
) -> tuple[CodeTables, tuple[int, int, int, int], torch.Tensor]:
    """The codes' kernel tables, the caches' common (batch, H, seq, d) shape and `rows` as int64 on their device; a
    ValueError unless every cache has that shape, with the codes' H and d."""
    device = caches[0].device
    tab = tables(codes, device)
    shape = tuple(caches[0].shape)
    if any(tuple(x.shape) != shape for x in caches) or (shape[1], shape[3]) != (tab.heads, tab.dim):
        raise ValueError(
            f"caches {[tuple(x.shape) for x in caches]} do not all have the codes' {tab.heads} x {tab.dim}"
        )
    return tab, shape, rows.to(device=device, dtype=torch.int64).contiguous()


def single_layers(units: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """The layers of Reuse units of one layer each: the kernels code per-head units only (joint units take the
    torch reference, see `hf_scd.backend`)."""
    if any(len(unit) != 1 for unit in units):
        raise ValueError("the kernels code Reuse units of one layer; joint units of several layers take the reference")
    return [unit[0] for unit in units]
