"""Weight-only quantized linear (w8a16 / w4a16): y = x @ dequant(W)^T, W packed as in
kernels/reference/dequant.py (int8 [N, K], or uint8 [N, K/2] holding q + 8 two per byte, low
nibble = even column; fp32 scales [N, K / GROUP]). The integers are read packed and dequantized
in registers, one [BLOCK_N, BLOCK_K] tile at a time: decode reads 2x / 4x fewer weight bytes.

Two tile shapes (configs, not code): GEMV-shaped for decode (BLOCK_M 16, wide BLOCK_K) and
GEMM-shaped for prefill; the wrapper picks by the number of rows.
"""

import triton
import triton.language as tl


@triton.jit
def wlinear_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    rm = rm.to(tl.int64)      # row offsets past 2**31 elements: a long prefill's [M, vocab] logits
    rn = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk[None, :] < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok & k_ok, other=0.0)
        if BITS == 8:
            q = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=n_ok & k_ok, other=0).to(tl.float32)
        else:
            byte = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :] // 2, mask=n_ok & k_ok, other=8)
            nib = (byte.to(tl.int32) >> ((rk[None, :] % 2) * 4)) & 0xF
            q = nib.to(tl.float32) - 8.0
        s = tl.load(s_ptr + rn[:, None] * stride_sn + rk[None, :] // GROUP, mask=n_ok & k_ok, other=0.0)
        w = q * s                                       # fp32, the reference's q * s
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # cast like the reference, accumulate in fp32
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok & (rn[None, :] < N))


def default_config() -> dict:
    """Untuned starting points: GEMV tiles up to 16 rows, GEMM tiles above."""
    return {"gemv": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2},
            "gemm": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
            "GEMV_MAX_ROWS": 16}
