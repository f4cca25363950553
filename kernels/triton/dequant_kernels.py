"""In-register dequantization of packed weights, shared by the packed MoE and embedding kernels.

Layout (kernels/reference/dequant.py): wint8 data int8 [..., out, in]; wint4 data uint8
[..., out, in / 2] holding q + 8, the low nibble the even column; fp32 scales [..., out, groups],
column c of row r scaled by s[r, c // GROUP] (GROUP = in / groups, = in when per channel).
The value is q * s in fp32, as the reference computes it.
"""

import triton
import triton.language as tl


@triton.jit
def int_values(q_ptr, row_off, cols, mask, stride_qk, BITS: tl.constexpr):
    """fp32 q at logical columns `cols` of the rows at pointer offsets `row_off` (broadcast
    together). wint4 reads byte cols // 2 for both columns of a pair (cached) and shifts by the
    column's parity. Masked lanes read 0."""
    if BITS == 8:
        q = tl.load(q_ptr + row_off + cols * stride_qk, mask=mask, other=0).to(tl.float32)
    else:
        byte = tl.load(q_ptr + row_off + (cols // 2) * stride_qk, mask=mask, other=0x88)
        nib = (byte.to(tl.int32) >> ((cols % 2) * 4)) & 0xF
        q = (nib - 8).to(tl.float32)
    return q
