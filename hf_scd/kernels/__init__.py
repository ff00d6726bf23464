"""Triton kernels for the codec's hot paths: `encode_rows` and `decode_rows` on CUDA tensors.

`hf_scd.codec` is the reference; these functions have exactly its signatures, and `hf_scd.backend` calls them
instead of it for CUDA tensors.
Nothing heavy is imported here, so `available()` answers False cheaply on machines without Triton or a GPU.
"""

from __future__ import annotations

__all__ = ["available", "decode_rows", "encode_rows"]


def available() -> bool:
    """True iff Triton imports and a CUDA device is present: the codec only dispatches here then."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available()


def __getattr__(name: str):
    """`encode_rows` / `decode_rows` (same signatures as `hf_scd.codec`'s), imported with triton on first use."""
    if name == "encode_rows":
        from .encode import encode_rows

        return encode_rows
    if name == "decode_rows":
        from .decode import decode_rows

        return decode_rows
    raise AttributeError(f"module 'hf_scd.kernels' has no attribute {name!r}")
