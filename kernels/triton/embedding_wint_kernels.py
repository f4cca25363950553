"""Packed embedding lookup: out[t] = dequant(W[ids[t]]), only the rows read are dequantized (a
tied model keeps one packed table for the lookup and the head). Grid (T, cdiv(H, BLOCK_H))."""

import triton
import triton.language as tl

from ._interpret import cast_rtne
from .dequant_kernels import int_values


@triton.jit
def embedding_wint_kernel(ids_ptr, q_ptr, s_ptr, out_ptr, H, stride_qv, stride_qk, stride_sv, stride_sg,
                          stride_o, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    row = tl.load(ids_ptr + t).to(tl.int64)
    q = int_values(q_ptr, row * stride_qv, cols, mask, stride_qk, BITS)
    s = tl.load(s_ptr + row * stride_sv + (cols // GROUP) * stride_sg, mask=mask, other=0.0)
    tl.store(out_ptr + t * stride_o + cols, cast_rtne(q * s, out_ptr.dtype.element_ty), mask=mask)
