"""Paged GQA attention wrapper with the reference signature (kernels/reference/attention.py):

    make_gqa_attention(config) -> gqa_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                query_start_loc, scale) -> out [T, nh, d]

Path by shape alone, as the reference does (no host sync): T == B means one query per sequence
-> decode kernel (split along the context, then a reduce when split); otherwise the prefill
kernel, which also covers chunked prefill (a cached prefix before the new queries) and ragged
batches. Grids come from shapes: prefill T // BLOCK_Q + B q-blocks (spare ones return at once),
decode B x nkv x num_parts with num_parts from the block-table width (fixed per shape, so a
captured graph stays valid); each sequence splits its own context over as many of them as its
real length fills (at least PARTITION_SIZE keys per split), read on the device, and the reduce
merges REDUCE_TILE partials per step.

Config (flat dict, all keys optional; defaults in DEFAULT_CONFIG):
    BLOCK_M            prefill score-tile rows = query tokens x the G heads of one kv group
                       (power of two >= 16; raised to next_pow2(G) when G is larger)
    BLOCK_N            prefill keys per tile (power of two >= 16)
    num_warps, num_stages                prefill launch options
    PARTITION_SIZE     decode: fewest keys per split (a multiple of DECODE_BLOCK_N); a
                       sequence of L keys uses min(cdiv(L, PARTITION_SIZE), num_parts) splits
    DECODE_PROGRAMS    decode: the split stops growing once B * nkv * num_parts reaches this,
                       which also bounds the fp32 scratch (num_parts partials of [nh, d] per seq)
    DECODE_BLOCK_N     decode keys per tile (power of two >= 16)
    decode_num_warps, decode_num_stages  decode (and reduce) launch options
    waves_per_eu, matrix_instr_nonkdim, kpack   AMD only: passed when present and the target is
                       HIP (or the interpreter, which ignores them), dropped on CUDA
"""

import torch
import triton

from ._interpret import AMD_OPTIONS, INTERPRET, check_keys, launch_options
from .attention_kernels import (LOG2E, decode_attention_kernel, decode_reduce_kernel,
                                prefill_attention_kernel)

DEFAULT_CONFIG = {
    "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2,
    "PARTITION_SIZE": 256, "DECODE_PROGRAMS": 2048, "DECODE_BLOCK_N": 64,
    "decode_num_warps": 4, "decode_num_stages": 2,
}
CONFIG_KEYS = (*DEFAULT_CONFIG, *AMD_OPTIONS)
_POW2_KEYS = ("BLOCK_M", "BLOCK_N", "DECODE_BLOCK_N")
REDUCE_TILE = 16         # partials the decode reduce merges per step
_INT_DTYPES = (torch.int32, torch.int64)


def normalize_config(config) -> dict:
    """None | partial dict -> full dict, validated (unknown keys and bad tiles raise)."""
    config = dict(config or {})
    check_keys(config, CONFIG_KEYS, "gqa_attention config")
    cfg = {**DEFAULT_CONFIG, **{k: v for k, v in config.items() if v is not None}}
    for k in _POW2_KEYS:
        v = cfg[k]
        if v < 16 or v & (v - 1):
            raise ValueError(f"gqa_attention config: {k}={v} must be a power of two >= 16 (tl.dot)")
    if cfg["PARTITION_SIZE"] < cfg["DECODE_BLOCK_N"] or cfg["PARTITION_SIZE"] % cfg["DECODE_BLOCK_N"]:
        raise ValueError(f"gqa_attention config: PARTITION_SIZE={cfg['PARTITION_SIZE']} must be a "
                         f"multiple of DECODE_BLOCK_N={cfg['DECODE_BLOCK_N']}")
    if cfg["DECODE_PROGRAMS"] < 1:
        raise ValueError("gqa_attention config: DECODE_PROGRAMS must be >= 1")
    return cfg


def _check(q, k_cache, v_cache, block_tables, context_lens, query_start_loc):
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"gqa_attention: q [T, nh, d] and caches [blocks, block_size, nkv, d] "
                         f"expected, got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"gqa_attention: v_cache {tuple(v_cache.shape)} != k_cache "
                         f"{tuple(k_cache.shape)}")
    T, nh, d = q.shape
    nkv = k_cache.shape[2]
    if k_cache.shape[3] != d or nh % nkv:
        raise ValueError(f"gqa_attention: q heads {nh} x d {d} do not fit cache kv heads {nkv} "
                         f"x d {k_cache.shape[3]} (nh must be a multiple of nkv)")
    B = block_tables.shape[0]
    if (block_tables.dim() != 2 or context_lens.shape != (B,) or query_start_loc.shape != (B + 1,)
            or block_tables.dtype not in _INT_DTYPES or context_lens.dtype not in _INT_DTYPES
            or query_start_loc.dtype not in _INT_DTYPES):
        raise ValueError(f"gqa_attention: integer block_tables [B, max_blocks], context_lens [B], "
                         f"query_start_loc [B+1] expected, got {tuple(block_tables.shape)} "
                         f"{block_tables.dtype}, {tuple(context_lens.shape)} {context_lens.dtype}, "
                         f"{tuple(query_start_loc.shape)} {query_start_loc.dtype}")
    devs = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens, query_start_loc)}
    if len(devs) != 1:
        raise ValueError(f"gqa_attention: tensors on several devices {sorted(map(str, devs))}")


def make_gqa_attention(config: dict | None = None):
    """-> gqa_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale)."""
    cfg = normalize_config(config)
    prefill_opts = launch_options(cfg)
    decode_opts = launch_options({**cfg, "num_warps": cfg["decode_num_warps"],
                                  "num_stages": cfg["decode_num_stages"]})

    def gqa_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale):
        _check(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
        T, nh, d = q.shape
        B, max_blocks = block_tables.shape
        bs, nkv = k_cache.shape[1], k_cache.shape[2]
        G = nh // nkv
        out = torch.empty_like(q)
        if T == 0 or B == 0:
            return out
        block_d = max(16, triton.next_power_of_2(d))
        # 16-bit dots only where q and both caches share the dtype; fp32 stays IEEE fp32.
        fp32_dot = INTERPRET or q.dtype == torch.float32 or not (
            q.dtype == k_cache.dtype == v_cache.dtype)
        qk_scale = float(scale) * LOG2E
        common = (q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
                  out.stride(2), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0))

        if T == B:   # decode: one query per sequence
            block_n = cfg["DECODE_BLOCK_N"]
            capacity = max_blocks * bs            # upper bound on any context, from the shape
            num_parts = max(1, min(triton.cdiv(capacity, cfg["PARTITION_SIZE"]),
                                   cfg["DECODE_PROGRAMS"] // (B * nkv)))
            part_size = triton.cdiv(triton.cdiv(capacity, num_parts), block_n) * block_n
            num_parts = triton.cdiv(capacity, part_size)
            one = num_parts == 1
            if one:
                part = m = l = out
            else:
                part = torch.empty((B, nh, num_parts, d), dtype=torch.float32, device=q.device)
                m = torch.empty((B, nh, num_parts), dtype=torch.float32, device=q.device)
                l = torch.empty_like(m)
            decode_attention_kernel[(B, nkv, num_parts)](
                q, k_cache, v_cache, part, m, l, block_tables, context_lens, qk_scale, *common,
                G=G, HEAD_DIM=d, BLOCK_D=block_d, min_part=cfg["PARTITION_SIZE"], num_parts=num_parts,
                BLOCK_SIZE=bs, BLOCK_H=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,
                ONE_PART=one, FP32_DOT=fp32_dot, **decode_opts)
            if not one:
                decode_reduce_kernel[(B, nh)](
                    part, m, l, out, context_lens, nh, num_parts, cfg["PARTITION_SIZE"],
                    out.stride(0), out.stride(1), out.stride(2), HEAD_DIM=d, BLOCK_D=block_d,
                    BLOCK_N=block_n, BLOCK_P=min(REDUCE_TILE, triton.next_power_of_2(num_parts)),
                    **decode_opts)
            return out

        block_m = max(cfg["BLOCK_M"], triton.next_power_of_2(G))
        block_q = block_m // G
        prefill_attention_kernel[(T // block_q + B, nkv)](
            q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc, B, qk_scale,
            *common, G=G, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_SIZE=bs, BLOCK_M=block_m,
            BLOCK_Q=block_q, BLOCK_N=cfg["BLOCK_N"], FP32_DOT=fp32_dot, **prefill_opts)
        return out

    return gqa_attention
