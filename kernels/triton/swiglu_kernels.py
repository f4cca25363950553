"""SwiGLU activation kernels: h = silu(g) * u, rounded as Hugging Face rounds it.

HF (and kernels/reference/mlp.py) computes, in the activation dtype: gate = linear(x) (rounded),
up = linear(x) (rounded), silu(gate) (fp32 inside, rounded), product (rounded). `silu_mul`
repeats that rounding sequence on fp32 values: a product of two 16-bit floats is exact in fp32,
so one cast after it equals torch's 16-bit multiply bit for bit. The grouped MoE kernel calls the
same helper in its epilogue.
"""

import triton
import triton.language as tl

from ._interpret import cast_rtne


@triton.jit
def silu_mul(g, u, OUT_DTYPE: tl.constexpr):
    """g, u: fp32 tiles (already rounded to OUT_DTYPE where they came from a GEMM) -> OUT_DTYPE."""
    s = cast_rtne(g * tl.sigmoid(g), OUT_DTYPE).to(tl.float32)
    return cast_rtne(s * u, OUT_DTYPE)


@triton.jit
def swiglu_kernel(g_ptr, u_ptr, o_ptr, N, stride_g, stride_u, stride_o,
                  BLOCK_N: tl.constexpr):
    """One row x BLOCK_N columns per program; grid (rows, cdiv(N, BLOCK_N)). o may alias g."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    h = silu_mul(g, u, o_ptr.dtype.element_ty)
    tl.store(o_ptr + row * stride_o + cols, h, mask=mask)
