"""What both kernels read of the rotary embedding: the (cos, sin) of each token's row, split in the two halves that
`rotate_half` swaps."""

import triton
import triton.language as tl


@triton.jit
def load_rotary(cos_ptr, sin_ptr, row, scr, ssr, lo, hi, tmask):
    """fp32 (cos_lo, cos_hi, sin_lo, sin_hi) of rows `row` at columns `lo` and `hi` = lo + head_dim / 2; masked
    tokens read cos 1, sin 0."""
    cos_row = cos_ptr + row[:, None] * scr
    sin_row = sin_ptr + row[:, None] * ssr
    c_lo = tl.load(cos_row + lo[None, :], mask=tmask[:, None], other=1.0).to(tl.float32)
    c_hi = tl.load(cos_row + hi[None, :], mask=tmask[:, None], other=1.0).to(tl.float32)
    s_lo = tl.load(sin_row + lo[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    s_hi = tl.load(sin_row + hi[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    return c_lo, c_hi, s_lo, s_hi
