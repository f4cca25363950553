"""Paged GQA attention kernels: flash-style prefill (also chunked prefill and ragged batches) and
split-K decode with a reduce. Semantics: kernels/reference/attention.py.

Layout: q [T, nh, d]; k/v cache [num_blocks, BLOCK_SIZE, nkv, d]; token p of sequence b lives in
block block_tables[b, p // BLOCK_SIZE] at row p % BLOCK_SIZE. K/V are gathered per key through
the block table, so BLOCK_N and BLOCK_SIZE are independent.

GQA: one program serves all G = nh // nkv query heads of one kv head, so every K/V tile is read
once per group and never repeated. In prefill a tile row is a (query token, head) pair:
row r -> token r // G, head r % G, BLOCK_Q = BLOCK_M // G tokens per tile (vLLM's unified
attention does the same). In decode the rows are the G heads of the single query.

Precision: scores, softmax and the P.V sum accumulate in fp32 (exp2 with log2(e) folded into the
scale). `FP32_DOT` upcasts both dot operands and asks for IEEE fp32: set for fp32 inputs (no TF32),
mixed q/cache dtypes, and under the interpreter, which computes bf16 dots wrong. Otherwise q.K
runs in the 16-bit input dtype and P is cast to V's dtype for P.V, as in FlashAttention.
"""

import triton
import triton.language as tl

from ._interpret import cast_rtne

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _find_seq(qsl_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning grid q-block `q_block`: sequence b owns the q-blocks from
    qsl[b] // BLOCK_Q + b on (>= cdiv(q_len_b, BLOCK_Q) of them), so a grid of
    T // BLOCK_Q + B programs covers every batch without reading lengths on the host."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(q, acc, m_i, l_i, kv_start, kv_end, q_pos, bt_row_ptr, k_base, v_base,
                 offs_d, d_ok, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                 qk_scale, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr):
    """One BLOCK_N tile of keys from kv_start into the online softmax of rows q [M, D].
    Keys >= kv_end are masked; with CAUSAL, also keys past each row's position q_pos."""
    kpos = kv_start + tl.arange(0, BLOCK_N)
    k_ok = kpos < kv_end
    # Per-key gather through the block table (int64: caches pass 2**31 elements).
    blk = tl.load(bt_row_ptr + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
    row = (kpos % BLOCK_SIZE).to(tl.int64)
    k_off = blk * stride_kb + row * stride_kt
    v_off = blk * stride_vb + row * stride_vt
    kt = tl.load(k_base + k_off[None, :] + offs_d[:, None] * stride_kd,
                 mask=d_ok[:, None] & k_ok[None, :], other=0.0)               # [D, N]
    s = _dot(q, kt, FP32_DOT) * qk_scale                                      # [M, N] log2 units
    ok = k_ok[None, :]
    if CAUSAL:
        ok = ok & (kpos[None, :] <= q_pos[:, None])
    s = tl.where(ok, s, float("-inf"))
    # Every row has a visible key in its first tile (key 0 in prefill, the partition's first in
    # decode), so m_new is finite from then on: no -inf - -inf NaNs, no empty rows.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + v_off[:, None] + offs_d[None, :] * stride_vd,
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)                # [N, D]
    if not FP32_DOT:
        p = p.to(v.dtype)
    acc = acc * alpha[:, None] + _dot(p, v, FP32_DOT)
    return acc, m_new, l_i


@triton.jit
def prefill_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, bt_ptr, ctx_ptr, qsl_ptr, num_seqs, qk_scale,
        stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
        stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
        stride_bt,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr):
    """Grid (T // BLOCK_Q + B, nkv). Program: BLOCK_Q query tokens x G heads of one sequence."""
    q_block = tl.program_id(0)
    kvh = tl.program_id(1)
    b = _find_seq(qsl_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    tile = q_block - (q_start // BLOCK_Q + b)
    if tile * BLOCK_Q >= q_len:             # spare program of this sequence's q-block range
        return
    ctx = tl.load(ctx_ptr + b)
    prefix = ctx - q_len                    # keys cached before this step's queries

    rows = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + rows // G        # query index within the sequence
    head = kvh * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (tok < q_len)
    q_pos = prefix + tok                    # absolute position: sees keys 0..q_pos
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tok64 = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)

    bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # Keys 0..prefix + first token are visible to every row: whole tiles there skip the causal
    # mask; the rest, up to the last row's position, is masked per row.
    last_tok = tl.minimum(q_len, (tile + 1) * BLOCK_Q) - 1
    kv_end = prefix + last_tok + 1
    full_end = (prefix + tile * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, kv_end, q_pos, bt_row_ptr, k_base,
                                     v_base, offs_d, d_ok, stride_kb, stride_kt, stride_kd,
                                     stride_vb, stride_vt, stride_vd, qk_scale, BLOCK_SIZE,
                                     BLOCK_N, False, FP32_DOT)
    for start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, kv_end, q_pos, bt_row_ptr, k_base,
                                     v_base, offs_d, d_ok, stride_kb, stride_kt, stride_kd,
                                     stride_vb, stride_vt, stride_vd, qk_scale, BLOCK_SIZE,
                                     BLOCK_N, True, FP32_DOT)

    out = acc / l_i[:, None]
    tl.store(out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh
             + offs_d[None, :] * stride_od, cast_rtne(out, out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _split_size(ctx, min_part, num_parts, BLOCK_N: tl.constexpr):
    """Keys per split of a context of `ctx` keys: as many splits as it has min_part-key pieces,
    at most num_parts (the grid's), each a multiple of BLOCK_N. Computed from the real length on
    the device, so a short sequence in a graph captured for long ones still fills the grid."""
    n_split = tl.minimum(tl.maximum(tl.cdiv(ctx, min_part), 1), num_parts)
    return tl.cdiv(tl.cdiv(ctx, n_split), BLOCK_N) * BLOCK_N


@triton.jit
def decode_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, m_ptr, l_ptr, bt_ptr, ctx_ptr, qk_scale,
        stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
        stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
        stride_bt,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        min_part, num_parts,
        BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        ONE_PART: tl.constexpr, FP32_DOT: tl.constexpr):
    """Grid (B, nkv, num_parts): the G heads of sequence b's one query over keys
    [part * part_size, +part_size) of its context, part_size from its real length
    (_split_size). ONE_PART: writes the output directly. Otherwise writes the unnormalised fp32
    partial to out [B, nh, num_parts, d] (scratch) with its row max m and sum l
    [B, nh, num_parts] for decode_reduce_kernel; partitions at or past the context write
    nothing. min_part and num_parts are runtime values, so growing block tables do not recompile."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    part_size = _split_size(ctx, min_part, num_parts, BLOCK_N)
    kv_start = part * part_size
    if kv_start >= ctx:
        return
    kv_end = tl.minimum(kv_start + part_size, ctx)

    rows = tl.arange(0, BLOCK_H)
    head = kvh * G + rows
    row_ok = rows < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)

    bt_row_ptr = bt_ptr + b64 * stride_bt
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for start in range(kv_start, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, kv_end, rows, bt_row_ptr, k_base,
                                     v_base, offs_d, d_ok, stride_kb, stride_kt, stride_kd,
                                     stride_vb, stride_vt, stride_vd, qk_scale, BLOCK_SIZE,
                                     BLOCK_N, False, FP32_DOT)

    mask = row_ok[:, None] & d_ok[None, :]
    if ONE_PART:
        tl.store(out_ptr + b64 * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 cast_rtne(acc / l_i[:, None], out_ptr.dtype.element_ty), mask=mask)
    else:
        ml = (b64 * (G * tl.num_programs(1)) + head) * num_parts + part   # [B, nh, num_parts]
        tl.store(m_ptr + ml, m_i, mask=row_ok)
        tl.store(l_ptr + ml, l_i, mask=row_ok)
        tl.store(out_ptr + ml[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask)


@triton.jit
def decode_reduce_kernel(part_ptr, m_ptr, l_ptr, out_ptr, ctx_ptr, nh, num_parts, min_part,
                         stride_ot, stride_oh, stride_od,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """Grid (B, nh): merges the live partials of one (sequence, head), BLOCK_P at a time (a tile
    of partials per step, not one: SGLang's decode reduce), with the main loop's rescaling:
    out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    n_live = tl.cdiv(ctx, _split_size(ctx, min_part, num_parts, BLOCK_N))   # >= 1
    base = (b.to(tl.int64) * nh + h) * num_parts
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_p = tl.arange(0, BLOCK_P)
    ok = offs_p < n_live
    m_p = tl.load(m_ptr + base + offs_p, mask=ok, other=float("-inf"))
    m_run = tl.max(m_p, axis=0)
    w = tl.exp2(m_p - m_run)
    l_run = tl.sum(w * tl.load(l_ptr + base + offs_p, mask=ok, other=0.0), axis=0)
    tile = tl.load(part_ptr + (base + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.sum(w[:, None] * tile, axis=0)
    for p0 in range(BLOCK_P, n_live, BLOCK_P):
        p = p0 + offs_p
        ok = p < n_live
        m_p = tl.load(m_ptr + base + p, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m_p, axis=0))
        a = tl.exp2(m_run - m_new)
        w = tl.exp2(m_p - m_new)
        l_run = l_run * a + tl.sum(w * tl.load(l_ptr + base + p, mask=ok, other=0.0), axis=0)
        tile = tl.load(part_ptr + (base + p)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * a + tl.sum(w[:, None] * tile, axis=0)
        m_run = m_new
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d * stride_od,
             cast_rtne(acc / l_run, out_ptr.dtype.element_ty), mask=d_ok)
