"""Grouped expert GEMMs on packed weights (w8a16 / w4a16): the float MoE kernels' tiling, routing
layout and epilogues (moe_kernels.py), with each B tile read as packed integers and dequantized
in registers. Decode reads 2x (wint8) / ~4x (wint4) fewer expert bytes than bf16.

Weights (kernels/triton/dequant_kernels.py): data [E, N, K] int8 or [E, N, K/2] uint8, fp32
scales [E, N, groups]. The wrapper picks BLOCK_K dividing GROUP (or GROUP = K, per channel), so
one K tile lies in one group and its scales are one [BLOCK_N] vector per tile.

Precision: the reference's (kernels/reference/quantized.py): w = q * s in fp32, cast to the
activation dtype, then the dot with fp32 accumulation; epilogues as in moe_kernels.py.
"""

import triton
import triton.language as tl

from ._interpret import cast_rtne
from .dequant_kernels import int_values
from .moe_kernels import _dot, _store_down, _store_gate_up, _tile_ids, _tile_rows


@triton.jit
def _weight_tile(q_ptr, s_ptr, e, offs_n, col_ok, k0, offs_k, K, stride_qe, stride_qn, stride_qk,
                 stride_se, stride_sn, stride_sg, BITS: tl.constexpr, GROUP: tl.constexpr, DTYPE: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile of W[e]^T at rows offs_n, columns k0 + offs_k: q * s in fp32, then
    rounded to DTYPE (the activations'), as the reference rounds its dequantized weight."""
    kk = k0 + offs_k
    mask = (kk < K)[:, None] & col_ok[None, :]
    q = int_values(q_ptr, e * stride_qe + offs_n[None, :] * stride_qn, kk[:, None], mask, stride_qk, BITS)
    s = tl.load(s_ptr + e * stride_se + offs_n * stride_sn + (k0 // GROUP) * stride_sg, mask=col_ok, other=0.0)
    return cast_rtne(q * s[None, :], DTYPE)


@triton.jit
def moe_gate_up_wint_kernel(x_ptr, qg_ptr, sg_ptr, qu_ptr, su_ptr, h_ptr, sorted_ids_ptr, expert_ids_ptr,
                            num_post_ptr, N, K, num_valid, num_pid_m, stride_xm, stride_xk,
                            stride_gqe, stride_gqn, stride_gqk, stride_gse, stride_gsn, stride_gsg,
                            stride_uqe, stride_uqn, stride_uqk, stride_use, stride_usn, stride_usg,
                            stride_hm, stride_hn,
                            BITS: tl.constexpr, GROUP: tl.constexpr, TOP_K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """h[entry, n] = silu(x[entry // TOP_K] . Wg[e, n]) * (x[entry // TOP_K] . Wu[e, n]),
    Wg/Wu packed [E, N=I, K=H]; x [T, K], h [T*TOP_K, N]."""
    pid_m, pid_n, live = _tile_ids(N, num_post_ptr, num_pid_m, BLOCK_M, BLOCK_N, GROUP_M)
    if live:
        entry, row_ok, e, offs_n, col_ok, offs_k = _tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n,
                                                              num_valid, N, BLOCK_M, BLOCK_N, BLOCK_K)
        a_ptrs = x_ptr + (entry // TOP_K)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            bg = _weight_tile(qg_ptr, sg_ptr, e, offs_n, col_ok, k0, offs_k, K, stride_gqe, stride_gqn,
                              stride_gqk, stride_gse, stride_gsn, stride_gsg, BITS, GROUP, a.dtype)
            bu = _weight_tile(qu_ptr, su_ptr, e, offs_n, col_ok, k0, offs_k, K, stride_uqe, stride_uqn,
                              stride_uqk, stride_use, stride_usn, stride_usg, BITS, GROUP, a.dtype)
            acc_g = _dot(a, bg, acc_g, DOT_FP32, IEEE)
            acc_u = _dot(a, bu, acc_u, DOT_FP32, IEEE)
            a_ptrs += BLOCK_K * stride_xk
        _store_gate_up(acc_g, acc_u, h_ptr, entry, row_ok, offs_n, col_ok, stride_hm, stride_hn)


@triton.jit
def moe_down_wint_kernel(h_ptr, qd_ptr, sd_ptr, y_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr,
                         num_post_ptr, N, K, num_valid, num_pid_m, stride_hm, stride_hk,
                         stride_dqe, stride_dqn, stride_dqk, stride_dse, stride_dsn, stride_dsg,
                         stride_ym, stride_yn,
                         BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr,
                         IEEE: tl.constexpr):
    """y[entry, n] = w[entry] * (h[entry] . Wd[e, n]), Wd packed [E, N=H, K=I]; h [T*k, K], y [T*k, N]."""
    pid_m, pid_n, live = _tile_ids(N, num_post_ptr, num_pid_m, BLOCK_M, BLOCK_N, GROUP_M)
    if live:
        entry, row_ok, e, offs_n, col_ok, offs_k = _tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n,
                                                              num_valid, N, BLOCK_M, BLOCK_N, BLOCK_K)
        a_ptrs = h_ptr + entry[:, None] * stride_hm + offs_k[None, :] * stride_hk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            b = _weight_tile(qd_ptr, sd_ptr, e, offs_n, col_ok, k0, offs_k, K, stride_dqe, stride_dqn,
                             stride_dqk, stride_dse, stride_dsn, stride_dsg, BITS, GROUP, a.dtype)
            acc = _dot(a, b, acc, DOT_FP32, IEEE)
            a_ptrs += BLOCK_K * stride_hk
        _store_down(acc, y_ptr, topk_w_ptr, entry, row_ok, offs_n, col_ok, stride_ym, stride_yn)
