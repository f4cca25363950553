"""Causal GQA attention over a block-based (paged) KV cache.

One op covers prefill, decode, chunked prefill and ragged batches. Query j of sequence b
(q_len_b queries, ctx_b cached tokens after this step's write) sits at position
ctx_b - q_len_b + j and sees keys 0..that position. Every sequence has q_len >= 1.
Scores, softmax and the value sum run in fp32; the result is cast to q.dtype.
"""

import torch
import torch.nn.functional as F

_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_SMALL_Q = 16   # up to this many queries per sequence the explicit matmul beats SDPA on CPU


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, nkv, d] -> caches [num_blocks, block_size, nkv, d] at flat slots, in place."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _attend(q, k, v, masked, scale):
    """q [N, Tq, g, d]; k, v [N, L, d] (strided views ok); masked [., Tq, 1, L] -> q.shape."""
    N, Tq, g, d = q.shape
    L = k.shape[1]
    s = torch.bmm(q.reshape(N, Tq * g, d), k.transpose(1, 2)) * scale    # [N, Tq*g, L]
    s.view(N, Tq, g, L).masked_fill_(masked, float("-inf"))
    return torch.bmm(torch.softmax(s, dim=-1), v).view(N, Tq, g, d)


def _explicit(q, k, v, allowed, scale):
    """q [B, Tq, nh, d]; k, v [B, L, nkv, d]; allowed [B, Tq, L] bool -> [B*Tq, nh, d] fp32.

    Query heads are grouped per kv head ([.., nkv, g, d]) so K/V are never repeated, and
    K/V are read as strided views: bmm takes them without the copy a 4-D matmul would make.
    """
    B, Tq, nh, d = q.shape
    nkv = k.shape[2]
    q32, k32, v32 = q.float().reshape(B, Tq, nkv, nh // nkv, d), k.float(), v.float()
    masked = ~allowed[:, :, None, :]                                       # [B, Tq, 1, L]
    if B == 1:  # kv heads are the bmm batch
        o = _attend(q32[0].transpose(0, 1), k32[0].transpose(0, 1), v32[0].transpose(0, 1),
                    masked, scale)
        return o.transpose(0, 1).reshape(Tq, nh, d)
    out = torch.empty(B, Tq, nkv, nh // nkv, d, dtype=torch.float32, device=q.device)
    for h in range(nkv):  # sequences are the bmm batch, one kv head at a time
        out[:, :, h] = _attend(q32[:, :, h], k32[:, :, h], v32[:, :, h], masked, scale)
    return out.view(B * Tq, nh, d)


def _sdpa(q, k, v, scale):
    """One sequence, many queries: q [Tq, nh, d], k, v [L, nkv, d] -> [Tq, nh, d] fp32.

    Flash-style SDPA keeps memory at O(Tq + L) instead of the [nh, Tq, L] score matrix.
    """
    Tq, nh, d = q.shape
    L, nkv = k.shape[0], k.shape[1]
    # [1, heads, T, d]: the 4-D form reaches the CPU flash kernel (3-D takes a 2x slower path).
    q32, k32, v32 = (t.float().transpose(0, 1)[None] for t in (q, k, v))
    if Tq == L:
        mask, causal = None, True
    else:  # chunked prefill: causal aligned to the bottom-right corner
        qpos = torch.arange(L - Tq, L, device=q.device)
        mask, causal = torch.arange(L, device=q.device)[None, :] <= qpos[:, None], False
    if _SDPA_GQA:
        o = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=nh != nkv)
    else:
        k32, v32 = (t.repeat_interleave(nh // nkv, dim=1) for t in (k32, v32))
        o = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, is_causal=causal,
                                           scale=scale)
    return o[0].transpose(0, 1)


def gqa_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, nh, d] (B ragged sequences) -> [T, nh, d] in q.dtype. See the module docstring."""
    T, nh, d = q.shape
    B = block_tables.shape[0]
    bs, nkv = k_cache.shape[1], k_cache.shape[2]
    if T == B:
        # Decode: one query per sequence, decided from shapes alone (no host sync).
        flat = block_tables.reshape(-1)          # index_select is ~6x faster than cache[table]
        k = k_cache.index_select(0, flat).view(B, -1, nkv, d)           # [B, MB*bs, nkv, d]
        v = v_cache.index_select(0, flat).view(B, -1, nkv, d)
        allowed = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]
        return _explicit(q.reshape(B, 1, nh, d), k, v, allowed[:, None, :], scale).to(q.dtype)

    out = torch.empty_like(q)
    starts, ctxs = query_start_loc.tolist(), context_lens.tolist()
    for b in range(B):
        s, e, ctx = starts[b], starts[b + 1], ctxs[b]
        tq = e - s
        nb = -(-ctx // bs)
        blocks = block_tables[b, :nb]
        k = k_cache.index_select(0, blocks).view(-1, nkv, d)[:ctx]        # [ctx, nkv, d]
        v = v_cache.index_select(0, blocks).view(-1, nkv, d)[:ctx]
        if tq <= _SMALL_Q:
            qpos = torch.arange(ctx - tq, ctx, device=q.device)
            allowed = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
            o = _explicit(q[s:e][None], k[None], v[None], allowed[None], scale)
        else:
            o = _sdpa(q[s:e], k, v, scale)
        out[s:e] = o
    return out
