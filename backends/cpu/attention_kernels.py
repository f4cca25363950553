"""Decode-sized rope + KV write and one-query attention for the CPU backend (attention.c).

Bound once at load like the other native ops; each takes the reference op's signature and
falls back to it for what attention.c does not take (other dtypes, mixed cache dtype, strided
heads, prefill attention: SDPA's flash kernel is the fast path there).
"""

from __future__ import annotations

import threading

import torch

from ...kernels.reference.attention import gqa_attention as ref_gqa_attention
from ...kernels.reference.rope import _inv_freq
from ...kernels.reference.rope import rope_kv_write as ref_rope_kv_write

NATIVE_DTYPES = (torch.bfloat16, torch.float32)
MAX_POSITION = 1 << 24          # positions.float() is exact below this


class RopeTable:
    """cos/sin [P, d/2] of positions 0..P-1, computed by torch with the reference's own
    expression (positions * inv_freq, then cos/sin), so a lookup is the reference's value.
    Grows by doubling when a step reaches past it (attention.c says so); else never recomputed."""

    def __init__(self):
        self._tables: dict = {}
        self._lock = threading.Lock()

    def get(self, d: int, theta: float, need: int) -> tuple:
        t = self._tables.get((d, theta))
        if t is None or t[0].shape[0] < need:
            with self._lock:
                t = self._tables.get((d, theta))
                if t is None or t[0].shape[0] < need:
                    size = max(4096, 1 << (need - 1).bit_length())
                    freqs = torch.arange(size, dtype=torch.int64).float()[:, None] * _inv_freq(d, theta, torch.device("cpu"))
                    t = (freqs.cos().contiguous(), freqs.sin().contiguous())
                    self._tables[(d, theta)] = t
        return t


def _heads_contiguous(x: torch.Tensor) -> bool:
    """[T, n, d] with each row's heads back to back (a column slice of a fused projection is)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def make_rope_kv_write(native):
    table = RopeTable()

    def rope_kv_write(q, k, v, positions, theta, k_cache, v_cache, slot_mapping):
        T, nh, d = q.shape
        nkv = k.shape[1]
        if (q.dtype not in NATIVE_DTYPES or not (q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype)
                or d % 2 or not (_heads_contiguous(q) and _heads_contiguous(k) and _heads_contiguous(v))
                or not (k_cache.is_contiguous() and v_cache.is_contiguous())
                or positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64
                or not (positions.is_contiguous() and slot_mapping.is_contiguous()) or T == 0):
            return ref_rope_kv_write(q, k, v, positions, theta, k_cache, v_cache, slot_mapping)
        out = torch.empty(T, nh, d, dtype=q.dtype)
        need = 0
        while True:     # the positions are checked in C: no reduction over them here
            cos, sin = table.get(d, float(theta), need)
            if not native.rope_kv_write(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(),
                                        v.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                        cos.shape[0], k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
                                        out.data_ptr(), T, nh, nkv, d, q.dtype == torch.bfloat16,
                                        torch.get_num_threads()):
                return out
            need = int(positions.max()) + 1
            if need > MAX_POSITION or int(positions.min()) < 0 or need <= cos.shape[0]:
                return ref_rope_kv_write(q, k, v, positions, theta, k_cache, v_cache, slot_mapping)

    rope_kv_write.ernie_hal_impl = "cpu-native-rope-kv"
    return rope_kv_write


def make_gqa_attention(native):
    def gqa_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale):
        T, nh, d = q.shape
        B = block_tables.shape[0]
        nkv = k_cache.shape[2]
        if (T != B or q.dtype not in NATIVE_DTYPES or not (q.dtype == k_cache.dtype == v_cache.dtype)
                or d % 16 or nh % nkv or not _heads_contiguous(q)
                or not (k_cache.is_contiguous() and v_cache.is_contiguous())
                or block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32
                or not (block_tables.is_contiguous() and context_lens.is_contiguous())):
            return ref_gqa_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale)
        out = torch.empty(T, nh, d, dtype=q.dtype)
        failed = native.decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                         block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
                                         out.data_ptr(), B, nh, nkv, d, k_cache.shape[1], float(scale),
                                         q.dtype == torch.bfloat16, torch.get_num_threads())
        if failed:
            raise MemoryError("decode attention: could not allocate its score buffer")
        return out

    gqa_attention.ernie_hal_impl = "cpu-native-decode-attention"
    return gqa_attention
