"""Wrapper of the weight-only quantized linear: `make_linear_wint(config)` -> linear(x, w) with
the reference op's signature (w a PackedWeight: .data, .scales, .bits), in x.dtype.

Config keys (all optional): "gemv" / "gemm" tile dicts (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
num_stages, AMD extras) and GEMV_MAX_ROWS (rows up to which the GEMV tiles are used).
"""

import torch
import triton

from ._interpret import AMD_OPTIONS, COMMON_OPTIONS, INTERPRET, check_keys, launch_options
from .wlinear_kernels import default_config, wlinear_kernel

TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", *COMMON_OPTIONS, *AMD_OPTIONS)


def make_linear_wint(config: dict | None = None):
    cfg = default_config()
    for key, value in (config or {}).items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    check_keys(cfg, ("gemv", "gemm", "GEMV_MAX_ROWS"), "linear (weight-only)")
    tiles = {}
    for shape in ("gemv", "gemm"):
        check_keys(cfg[shape], TILE_KEYS, f"linear (weight-only) {shape}")
        t = cfg[shape]
        tiles[shape] = ((t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]), launch_options(t))
    gemv_rows = int(cfg["GEMV_MAX_ROWS"])

    def linear(x: torch.Tensor, w) -> torch.Tensor:
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        q, s = w.data, w.scales
        N = q.shape[0]
        M = x2.shape[0]
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        if M and N:
            (bm, bn, bk), opts = tiles["gemv" if M <= gemv_rows else "gemm"]
            grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
            wlinear_kernel[grid](x2, q, s, out, M, N, K, x2.stride(0), q.stride(0), s.stride(0), out.stride(0),
                                 BITS=w.bits, GROUP=K // s.shape[-1], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                 DOT_FP32=INTERPRET or x.dtype == torch.float32, **opts)
        return out.view(*x.shape[:-1], N)

    return linear
