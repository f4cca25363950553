"""RoPE wrappers with the reference signatures (kernels/reference/rope.py):

    make_rope(config)          -> rope(q, k, positions, theta) -> (q_rot, k_rot)
    make_rope_kv_write(config) -> rope_kv_write(q, k, v, positions, theta, k_cache, v_cache,
                                                slot_mapping) -> q_rot

q [T, nh, d], k/v [T, nkv, d] (any token/head strides), positions [T] integer, caches
[num_blocks, block_size, nkv, d] written in place at the flat slots slot_mapping [T] (a
negative slot marks a padding token and is skipped). One launch, no host sync.
Config (all optional): num_warps (default 4, 8 from 4096 q elements per token), num_stages,
and the AMD extras waves_per_eu, matrix_instr_nonkdim, kpack (passed when the target is HIP or
the interpreter, dropped on CUDA).
"""

import functools

import torch
import triton

from ._interpret import AMD_OPTIONS, COMMON_OPTIONS, check_keys, launch_options
from .rope_kv_kernels import rope_kv_kernel

CONFIG_KEYS = (*COMMON_OPTIONS, *AMD_OPTIONS)


@functools.lru_cache(maxsize=32)
def _inv_freq(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # The reference's fp32 expression, so pos * inv_freq gives the reference's angles exactly.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The kernel wants the head dim contiguous; tokens and heads may be strided."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _launcher(config):
    config = dict(config or {})
    check_keys(config, CONFIG_KEYS, "rope")
    opts = launch_options(config)

    def launch(q, k, v, positions, theta, k_cache, v_cache, slot_mapping):
        if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            raise ValueError(f"rope: q [T, nh, d], k [T, nkv, d] expected, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}")
        T, nh, d = q.shape
        nkv = k.shape[1]
        if d % 2:
            raise ValueError(f"rope: head dim {d} must be even (pairs 2i, 2i+1)")
        if positions.shape != (T,):
            raise ValueError(f"rope: positions [{T}] expected, got {tuple(positions.shape)}")
        q, k = _rows(q), _rows(k)
        q_out = torch.empty((T, nh, d), dtype=q.dtype, device=q.device)
        write = k_cache is not None
        if write:
            if v.shape != k.shape or slot_mapping.shape != (T,):
                raise ValueError(f"rope_kv_write: v {tuple(v.shape)} must match k "
                                 f"{tuple(k.shape)}, slot_mapping [{T}] expected")
            if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or \
                    k_cache.shape[2:] != (nkv, d):
                raise ValueError(f"rope_kv_write: caches [blocks, block_size, {nkv}, {d}] "
                                 f"expected, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
            if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
                raise ValueError("rope_kv_write: caches need a contiguous head dim")
            v, k_out = _rows(v), None
            cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3])
            v_strides = (v.stride(0), v.stride(1))
        else:
            k_out = torch.empty((T, nkv, d), dtype=k.dtype, device=k.device)
            cache_strides, v_strides = (0,) * 6, (0, 0)
        if T:
            inv_freq = _inv_freq(d, float(theta), q.device)
            o = dict(opts)
            o.setdefault("num_warps", 8 if nh * d >= 4096 else 4)
            rope_kv_kernel[(T,)](
                q, k, v, positions, inv_freq, q_out, k_out, k_cache, v_cache, slot_mapping, nh,
                nkv, q.stride(0), q.stride(1), k.stride(0), k.stride(1), *v_strides,
                q_out.stride(0), q_out.stride(1),
                k_out.stride(0) if k_out is not None else 0,
                k_out.stride(1) if k_out is not None else 0, *cache_strides,
                HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2),
                BLOCK_HQ=triton.next_power_of_2(nh), BLOCK_HK=triton.next_power_of_2(nkv),
                BLOCK_SIZE=k_cache.shape[1] if write else 1, WRITE_CACHE=write, **o)
        return q_out, k_out

    return launch


def make_rope(config: dict | None = None):
    """-> rope(q, k, positions, theta) -> (q_rot, k_rot), new tensors in q's and k's dtypes."""
    launch = _launcher(config)

    def rope(q, k, positions, theta):
        return launch(q, k, None, positions, theta, None, None, None)

    return rope


def make_rope_kv_write(config: dict | None = None):
    """-> rope_kv_write(q, k, v, positions, theta, k_cache, v_cache, slot_mapping) -> q_rot;
    the rotated k and v land in the caches at slot_mapping."""
    launch = _launcher(config)

    def rope_kv_write(q, k, v, positions, theta, k_cache, v_cache, slot_mapping):
        return launch(q, k, v, positions, theta, k_cache, v_cache, slot_mapping)[0]

    return rope_kv_write
