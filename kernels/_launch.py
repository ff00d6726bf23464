"""What the encode and decode kernels share at launch: the autotuning space and the grid over (row blocks, heads)."""

from __future__ import annotations

import triton

from kernels._tables import INTERPRET

INTERPRET_BLOCK_T = 16


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the (BLOCK_T, C) fp32 tile at <= 16K elements: bigger ones spill and take minutes to compile."""
    dim = kwargs.get("D", named_args.get("D", 128))
    return [c for c in configs if c.kwargs["BLOCK_T"] * max(dim, 64) <= 16384]


def autotuned(kernel, key: list[str]):
    """`kernel` autotuned over token-block sizes and warp counts, keyed on the compile-time shape `key`."""
    configs = [
        triton.Config({"BLOCK_T": block}, num_warps=warps, num_stages=1)
        for block, warps in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))
    ]
    return triton.autotune(configs=configs, prune_configs_by={"early_config_prune": _prune}, key=key)(kernel)


def launch(kernel, tuned, rows: int, heads: int, args: tuple, meta: dict) -> None:
    """One program per (block of rows, head); the interpreter runs a single fixed block size, untuned."""
    if INTERPRET:
        kernel[(triton.cdiv(rows, INTERPRET_BLOCK_T), heads)](*args, **meta, BLOCK_T=INTERPRET_BLOCK_T)
    else:
        tuned[lambda m: (triton.cdiv(rows, m["BLOCK_T"]), heads)](*args, **meta)
