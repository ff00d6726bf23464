"""Batched CPU linear algebra, one matrix at a time: torch 2.13's batched LU (behind `torch.linalg.inv`, `solve` and
friends) fails inside oneMKL ("Parameter 6 was incorrect on entry to DLASWP") and never returns once a program has
called `torch.set_num_threads(n)` with n > 1, which serving replicas and benchmarks do. A single matrix takes the
unbatched path, which works."""

from __future__ import annotations

import torch


def inverse(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n, n) -> their inverses and `info` (..., ) as `torch.linalg.inv_ex` gives them (nonzero: singular)."""
    flat = matrices.flatten(0, -3) if matrices.ndim > 2 else matrices.unsqueeze(0)
    results = [torch.linalg.inv_ex(matrix) for matrix in flat.unbind(0)]
    inverses = torch.stack([result.inverse for result in results]).view_as(matrices)
    return inverses, torch.stack([result.info for result in results]).view(matrices.shape[:-2])


def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.linalg.solve(a, b)` for (..., n, n) `a` and (..., n, k) `b` of the same batch shape."""
    if a.ndim == 2:
        return torch.linalg.solve(a, b)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a, b = a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:])
    solved = [torch.linalg.solve(x, y) for x, y in zip(a.flatten(0, -3), b.flatten(0, -3), strict=True)]
    return torch.stack(solved).view(*batch, *solved[0].shape)
