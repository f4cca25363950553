"""RMSNorm kernels with Hugging Face's rounding, and an optional fused residual add.

HF: y = x.float() * rsqrt(mean(x.float()^2) + eps); y = y.to(x.dtype); out = weight * y.
The weight multiply runs on the rounded y: both factors are loaded as fp32 and multiplied once
(exact for 16-bit inputs), then cast, which equals torch's 16-bit multiply bit for bit and also
covers an fp32 weight (torch promotes to fp32, then the reference casts back).
With a residual, summed = x + residual is rounded to its dtype first, stored, and normalised.
"""

import triton
import triton.language as tl

from ._interpret import cast_rtne


@triton.jit
def rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, H, stride_x, stride_r, stride_y, stride_s,
                    eps, HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr):
    """One row per program; BLOCK_H = next_pow2(H) holds the whole row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = cast_rtne(x + r, s_ptr.dtype.element_ty)       # HF adds in the activation dtype
        tl.store(s_ptr + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / H
    y = cast_rtne(x * tl.math.rsqrt(var + eps), y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, cast_rtne(w * y, y_ptr.dtype.element_ty), mask=mask)
