"""What every per-(tokens, head, layer) kernel starts with: which coded tokens its program covers, and where they sit
in a (batch, H, seq, d) cache."""

import triton
import triton.language as tl


@triton.jit
def program_rows(rows_ptr, N, seq, BLOCK_T: tl.constexpr):
    """This program's tokens t of the N coded rows (a block along grid axis 0), the mask of those that exist, and
    each one's flat row (int64; 0 where masked) split into (batch, position)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    row = tl.load(rows_ptr + t, mask=tmask, other=0).to(tl.int64)
    b = row // seq
    return t, tmask, row, b, row - b * seq
