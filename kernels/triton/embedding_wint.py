"""Wrapper of the packed embedding lookup: `make_embedding_wint(config)` -> embedding(ids, w),
the reference signature (kernels/reference/quantized.py): ids [T] int, w a PackedWeight table
[V, H] -> [T, H] in w.dtype, q * s in fp32 rounded once. Ids are trusted (not range-checked on the
device, like F.embedding's CUDA kernel without its assert).

Config keys (all optional): BLOCK_H (columns per program, default min(1024, next_pow2(H))),
num_warps, num_stages and the AMD extras.
"""

import torch
import triton

from ._interpret import AMD_OPTIONS, COMMON_OPTIONS, check_keys, launch_options
from .embedding_wint_kernels import embedding_wint_kernel

CONFIG_KEYS = ("BLOCK_H", *COMMON_OPTIONS, *AMD_OPTIONS)


def make_embedding_wint(config: dict | None = None):
    config = dict(config or {})
    check_keys(config, CONFIG_KEYS, "embedding (weight-only)")
    opts = launch_options(config)

    def embedding(ids: torch.Tensor, w) -> torch.Tensor:
        H = w.shape[-1]
        flat = ids.reshape(-1)
        out = torch.empty((flat.numel(), H), dtype=w.dtype, device=w.data.device)
        if flat.numel() and H:
            block_h = config.get("BLOCK_H") or min(1024, triton.next_power_of_2(H))
            q, s = w.data, w.scales
            embedding_wint_kernel[(flat.numel(), triton.cdiv(H, block_h))](
                flat, q, s, out, H, q.stride(0), q.stride(1), s.stride(0), s.stride(1), out.stride(0),
                BITS=w.bits, GROUP=H // s.shape[-1], BLOCK_H=block_h, **opts)
        return out.view(*ids.shape, H)

    return embedding
