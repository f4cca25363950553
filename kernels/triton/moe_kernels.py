"""Fused MoE kernels: router top-k, grouped gate+up GEMM with SwiGLU, grouped down GEMM with the
routing weight, and the combine over the k slots (plus the shared expert's output).

Layout (see moe_align.py): the T*k routing entries, flat id t*k + j, are sorted by expert and
padded per expert to BLOCK_M rows; `sorted_ids[L]` holds entry ids (sentinel T*k = padding),
`expert_ids[L / BLOCK_M]` the expert of each block. A program owns one BLOCK_M x BLOCK_N tile of
one expert; its A rows are gathered through `sorted_ids` (row of x = entry // TOP_K), its B tile
is that expert's weight slice. Grid: cdiv(L, BLOCK_M) * cdiv(N, BLOCK_N) programs in GROUP_M
super-rows (the Triton matmul tutorial's swizzle, so neighbouring programs share B tiles).

Precision: accumulate in fp32; the gate/up epilogue rounds as HF does (swiglu_kernels.silu_mul);
the down epilogue multiplies by the routing weight and rounds once; the combine sums the k
rounded products in fp32. `DOT_FP32` upcasts dot operands (the interpreter computes bf16 dots
wrong); `IEEE` asks for full fp32 dots when the activations are fp32 (no TF32 on NVIDIA).
"""

import triton
import triton.language as tl

from ._interpret import cast_rtne
from .swiglu_kernels import silu_mul


@triton.jit
def moe_router_kernel(logits_ptr, x_ptr, wr_ptr, bias_ptr, w_ptr, ids_ptr, T, E, H, stride_l,
                      stride_x, stride_wr, norm_min,
                      TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_SLOTS: tl.constexpr, FUSED: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    """fp32 logits [T, E] -> softmax p; ids = top-k of p + bias (descending, ties to the lower
    expert); weights = p[ids] / max(sum, norm_min) in w's dtype. BLOCK_T tokens per program.
    FUSED: the logits are computed here, x [T, H] (upcast) times the fp32 router [E, H]^T
    accumulated in fp32 over BLOCK_H columns at a time: one launch instead of a GEMM and this
    kernel (decode-sized T; prefill keeps the GEMM)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    if FUSED:
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        offs_h = tl.arange(0, BLOCK_H)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + offs_h
            hmask = hh < H
            xt = tl.load(x_ptr + rows64[:, None] * stride_x + hh[None, :],
                         mask=rmask[:, None] & hmask[None, :], other=0.0).to(tl.float32)
            wt = tl.load(wr_ptr + cols.to(tl.int64)[:, None] * stride_wr + hh[None, :],
                         mask=cmask[:, None] & hmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(xt[:, None, :] * wt[None, :, :], axis=2)     # [BLOCK_T, BLOCK_E]
        logits = tl.where(cmask[None, :], acc, float("-inf"))
    else:
        logits = tl.load(logits_ptr + rows64[:, None] * stride_l + cols[None, :],
                         mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
    logits = tl.where(rmask[:, None], logits, 0.0)    # rows past T: finite, never stored
    num = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = num / tl.sum(num, axis=1)[:, None]                    # [BLOCK_T, BLOCK_E]
    score = probs
    if HAS_BIAS:
        score = probs + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    score = tl.where(cmask[None, :], score, float("-inf"))
    slots = tl.arange(0, BLOCK_SLOTS)
    ids = tl.zeros((BLOCK_T, BLOCK_SLOTS), dtype=tl.int32)
    wts = tl.zeros((BLOCK_T, BLOCK_SLOTS), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(score, axis=1, tie_break_left=True)       # [BLOCK_T]
        hit = cols[None, :] == best[:, None]
        p = tl.sum(tl.where(hit, probs, 0.0), axis=1)               # unbiased prob of the pick
        ids = tl.where(slots[None, :] == j, best[:, None], ids)
        wts = tl.where(slots[None, :] == j, p[:, None], wts)
        score = tl.where(hit, float("-inf"), score)
    wts = wts / tl.maximum(tl.sum(wts, axis=1), norm_min)[:, None]
    out = rows64[:, None] * TOP_K + slots[None, :]
    omask = rmask[:, None] & (slots[None, :] < TOP_K)
    tl.store(w_ptr + out, cast_rtne(wts, w_ptr.dtype.element_ty), mask=omask)
    tl.store(ids_ptr + out, ids.to(ids_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _tile_ids(N, num_post_ptr, num_pid_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n, live): GROUP_M swizzle; live is False past the used blocks."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    live = pid_m * BLOCK_M < tl.load(num_post_ptr)
    return pid_m, pid_n, live


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_FP32:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, num_valid, N, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile's routed entries (sorted rows; padding past num_valid masked), its expert, output
    columns and K offsets: the prologue every grouped-expert GEMM shares."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    entry = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)          # [BLOCK_M]
    row_ok = entry < num_valid
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    return entry, row_ok, e, offs_n, col_ok, tl.arange(0, BLOCK_K)


@triton.jit
def _store_gate_up(acc_g, acc_u, h_ptr, entry, row_ok, offs_n, col_ok, stride_hm, stride_hn):
    """h = silu(g) * u with both projections rounded to h's dtype first (as HF rounds them)."""
    out_ty = h_ptr.dtype.element_ty
    g = cast_rtne(acc_g, out_ty).to(tl.float32)
    u = cast_rtne(acc_u, out_ty).to(tl.float32)
    tl.store(h_ptr + entry[:, None] * stride_hm + offs_n[None, :] * stride_hn, silu_mul(g, u, out_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _store_down(acc, y_ptr, topk_w_ptr, entry, row_ok, offs_n, col_ok, stride_ym, stride_yn):
    """y = routing weight x the down projection rounded to y's dtype (HF: bf16 output x bf16 weight)."""
    out_ty = y_ptr.dtype.element_ty
    w = tl.load(topk_w_ptr + entry, mask=row_ok, other=0.0).to(tl.float32)
    y = cast_rtne(acc, out_ty).to(tl.float32) * w[:, None]
    tl.store(y_ptr + entry[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             cast_rtne(y, out_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def moe_gate_up_kernel(x_ptr, wg_ptr, wu_ptr, h_ptr, sorted_ids_ptr, expert_ids_ptr,
                       num_post_ptr, N, K, num_valid, num_pid_m,
                       stride_xm, stride_xk, stride_ge, stride_gn, stride_gk,
                       stride_ue, stride_un, stride_uk, stride_hm, stride_hn,
                       TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr,
                       IEEE: tl.constexpr):
    """h[entry, n] = silu(x[entry // TOP_K] . wg[e, n]) * (x[entry // TOP_K] . wu[e, n]).
    x [T, K=H], wg/wu [E, N=I, K], h [T*TOP_K, N]."""
    pid_m, pid_n, live = _tile_ids(N, num_post_ptr, num_pid_m, BLOCK_M, BLOCK_N, GROUP_M)
    if live:
        entry, row_ok, e, offs_n, col_ok, offs_k = _tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n,
                                                              num_valid, N, BLOCK_M, BLOCK_N, BLOCK_K)
        a_ptrs = x_ptr + (entry // TOP_K)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        g_ptrs = wg_ptr + e * stride_ge + offs_n[None, :] * stride_gn + offs_k[:, None] * stride_gk
        u_ptrs = wu_ptr + e * stride_ue + offs_n[None, :] * stride_un + offs_k[:, None] * stride_uk
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(a.dtype)
            bu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(a.dtype)
            acc_g = _dot(a, bg, acc_g, DOT_FP32, IEEE)
            acc_u = _dot(a, bu, acc_u, DOT_FP32, IEEE)
            a_ptrs += BLOCK_K * stride_xk
            g_ptrs += BLOCK_K * stride_gk
            u_ptrs += BLOCK_K * stride_uk
        _store_gate_up(acc_g, acc_u, h_ptr, entry, row_ok, offs_n, col_ok, stride_hm, stride_hn)


@triton.jit
def moe_down_kernel(h_ptr, wd_ptr, y_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr,
                    num_post_ptr, N, K, num_valid, num_pid_m,
                    stride_hm, stride_hk, stride_de, stride_dn, stride_dk, stride_ym, stride_yn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """y[entry, n] = w[entry] * (h[entry] . wd[e, n]).  h [T*k, K=I], wd [E, N=H, K], y [T*k, N]."""
    pid_m, pid_n, live = _tile_ids(N, num_post_ptr, num_pid_m, BLOCK_M, BLOCK_N, GROUP_M)
    if live:
        entry, row_ok, e, offs_n, col_ok, offs_k = _tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n,
                                                              num_valid, N, BLOCK_M, BLOCK_N, BLOCK_K)
        a_ptrs = h_ptr + entry[:, None] * stride_hm + offs_k[None, :] * stride_hk
        b_ptrs = wd_ptr + e * stride_de + offs_n[None, :] * stride_dn + offs_k[:, None] * stride_dk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(a.dtype)
            acc = _dot(a, b, acc, DOT_FP32, IEEE)
            a_ptrs += BLOCK_K * stride_hk
            b_ptrs += BLOCK_K * stride_dk
        _store_down(acc, y_ptr, topk_w_ptr, entry, row_ok, offs_n, col_ok, stride_ym, stride_yn)


@triton.jit
def moe_combine_kernel(y_ptr, shared_ptr, out_ptr, N, stride_ym, stride_sm, stride_om,
                       TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = sum_j y[t*TOP_K + j] (+ shared[t]), fp32 sum, one rounding. Grid (T, N tiles)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        y = tl.load(y_ptr + (t * TOP_K + j) * stride_ym + cols, mask=mask, other=0.0)
        acc += y.to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + t * stride_sm + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_om + cols, cast_rtne(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_align_kernel(ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr, n, E, num_blocks,
                     BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                     CHUNK_B: tl.constexpr):
    """moe_align.moe_align_block_size in one program (grid (1,)): for small T*k, where the torch
    version's dozen launches cost more than the work. Entries are visited in order, so the
    ranking within an expert is stable, like the torch version's stable argsort."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, n, CHUNK):                               # pass 1: tokens per expert
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_post_ptr, total)
    for b0 in range(0, num_blocks, CHUNK_B):                       # expert of each block + padding
        blocks = b0 + tl.arange(0, CHUNK_B)
        first = blocks * BLOCK_M
        e_of = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        e_of = tl.where(first < total, e_of, -1)
        tl.store(expert_ids_ptr + blocks, e_of, mask=blocks < num_blocks)
        mine = e_of[:, None] == experts[None, :]
        fill_from = tl.sum(tl.where(mine, starts + counts, 0), axis=1)   # 0 past the end
        pos = first[:, None] + tl.arange(0, BLOCK_M)[None, :]
        tl.store(sorted_ids_ptr + pos, tl.zeros_like(pos) + n,
                 mask=(pos >= fill_from[:, None]) & (blocks < num_blocks)[:, None])
    cursor = starts
    for start in range(0, n, CHUNK):                               # pass 2: scatter entry ids
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
        hot = (ids[:, None] == experts[None, :]).to(tl.int32)      # [CHUNK, BLOCK_E]
        before = tl.cumsum(hot, axis=0) - hot                      # same expert, earlier in chunk
        dest = tl.sum(hot * (cursor[None, :] + before), axis=1)
        tl.store(sorted_ids_ptr + dest, offs, mask=offs < n)
        cursor += tl.sum(hot, axis=0)
