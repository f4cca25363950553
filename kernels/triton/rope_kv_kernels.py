"""Interleaved RoPE (pairs 2i, 2i+1; kernels/reference/rope.py) on q and k, fused with the
paged KV-cache write of the rotated k and of v (kernels/reference/attention.kv_cache_write).

One program per token, all heads at once: the angles are computed once per token and shared by
every q and k head. inv_freq comes precomputed from the wrapper (the reference's fp32
expression), so the angles pos * inv_freq match the reference's bit for bit; cos/sin and the
rotation run in fp32. Rounding follows the reference: the rotated k is rounded to k's dtype,
then to the cache's (two steps only differ when the dtypes differ).
"""

import triton
import triton.language as tl

from ._interpret import cast_rtne


@triton.jit
def _rotate_store(x_ptr, o_ptr, t, n_heads, stride_xt, stride_xh, stride_ot, stride_oh,
                  offs_h, offs_i, i_ok, cos, sin, BLOCK_HEADS: tl.constexpr):
    """Rotate the pairs of n_heads heads of token t and store them in o's dtype; returns the
    rotated fp32 pairs, rounded to x's dtype, for the cache write."""
    mask = (offs_h < n_heads)[:, None] & i_ok[None, :]
    x_ptrs = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + 2 * offs_i[None, :]
    x0 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptrs + 1, mask=mask, other=0.0).to(tl.float32)
    o0 = cast_rtne(x0 * cos[None, :] - x1 * sin[None, :], x_ptr.dtype.element_ty)
    o1 = cast_rtne(x1 * cos[None, :] + x0 * sin[None, :], x_ptr.dtype.element_ty)
    if o_ptr is not None:
        o_ptrs = o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + 2 * offs_i[None, :]
        tl.store(o_ptrs, o0.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + 1, o1.to(o_ptr.dtype.element_ty), mask=mask)
    return o0, o1, mask


@triton.jit
def rope_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, q_out_ptr, k_out_ptr,
                   k_cache_ptr, v_cache_ptr, slot_ptr, nh, nkv,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_qot, stride_qoh, stride_kot, stride_koh,
                   stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                   BLOCK_HK: tl.constexpr, BLOCK_SIZE: tl.constexpr, WRITE_CACHE: tl.constexpr):
    """Grid (T,). q_out <- rope(q). WRITE_CACHE: k_cache/v_cache[slot] <- rope(k), v (slots < 0
    are padding and skipped); else k_out <- rope(k). The head dim is contiguous (stride 1)."""
    t = tl.program_id(0).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    i_ok = offs_i < HALF
    ang = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + offs_i, mask=i_ok,
                                                          other=0.0)
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    _rotate_store(q_ptr, q_out_ptr, t, nh, stride_qt, stride_qh, stride_qot, stride_qoh,
                  tl.arange(0, BLOCK_HQ), offs_i, i_ok, cos, sin, BLOCK_HQ)
    offs_hk = tl.arange(0, BLOCK_HK)
    if WRITE_CACHE:
        k0, k1, mask = _rotate_store(k_ptr, None, t, nkv, stride_kt, stride_kh, 0, 0, offs_hk,
                                     offs_i, i_ok, cos, sin, BLOCK_HK)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            blk = slot // BLOCK_SIZE
            row = slot % BLOCK_SIZE
            kc = (k_cache_ptr + blk * stride_kcb + row * stride_kct + offs_hk[:, None] * stride_kch
                  + 2 * offs_i[None, :])
            tl.store(kc, cast_rtne(k0.to(tl.float32), k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(kc + 1, cast_rtne(k1.to(tl.float32), k_cache_ptr.dtype.element_ty), mask=mask)
            # v is copied whole (not in pairs): one contiguous row per head.
            offs_d = tl.arange(0, 2 * BLOCK_HALF)
            vmask = (offs_hk < nkv)[:, None] & (offs_d < 2 * HALF)[None, :]
            v = tl.load(v_ptr + t * stride_vt + offs_hk[:, None] * stride_vh + offs_d[None, :],
                        mask=vmask, other=0.0)
            vc = (v_cache_ptr + blk * stride_vcb + row * stride_vct
                  + offs_hk[:, None] * stride_vch + offs_d[None, :])
            tl.store(vc, cast_rtne(v.to(tl.float32), v_cache_ptr.dtype.element_ty), mask=vmask)
    else:
        _rotate_store(k_ptr, k_out_ptr, t, nkv, stride_kt, stride_kh, stride_kot, stride_koh,
                      offs_hk, offs_i, i_ok, cos, sin, BLOCK_HK)
