"""fp32-accurate products on bf16 tensor cores, shared by both kernels.

An fp32 number is carried as a sum of bf16 pieces (hi + mid + lo holds all 24 bits of its mantissa), and a product
as the few piece products that matter: bf16 runs at twice TF32's rate, and a bf16 operand that is exact already
(a bf16 cache row, a half-integer code) needs one piece. Products of bf16 pieces are exact in the fp32 accumulator,
so the interpreter, which multiplies in fp32, computes what the GPU does, up to summation order.
"""

import triton
import triton.language as tl

from ._tables import INTERPRET

# The tensor-core operand type; the interpreter has no bf16 matmul and multiplies the (exactly bf16) values in fp32.
MMA_DTYPE = tl.constexpr(tl.float32 if INTERPRET else tl.bfloat16)


@triton.jit
def round_bf16(x):
    """fp32 `x` rounded to the nearest bf16 (ties to even), kept in fp32: the same bits on a GPU and in the
    interpreter, whose own conversion truncates."""
    u = x.to(tl.uint32, bitcast=True)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
