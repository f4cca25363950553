"""RMSNorm wrappers with the reference signatures:
`make_rms_norm(config)` -> rms_norm(x, weight, eps) and
`make_add_rms_norm(config)` -> add_rms_norm(x, residual, weight, eps) -> (normed, summed).

Any leading shape [..., H]; the output has x's shape and dtype (summed: the promoted dtype of
x + residual, as in torch). Config keys (all optional): num_warps (default by row width, as in
Liger-Kernel: 4, 8 from 2048, 16 from 8192), num_stages, and the AMD extras waves_per_eu,
matrix_instr_nonkdim, kpack.
"""

import torch
import triton

from ._interpret import AMD_OPTIONS, COMMON_OPTIONS, check_keys, launch_options
from .norm_kernels import rms_norm_kernel

CONFIG_KEYS = (*COMMON_OPTIONS, *AMD_OPTIONS)
MAX_H = 65536  # one row lives in registers


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launcher(config):
    config = dict(config or {})
    check_keys(config, CONFIG_KEYS, "rms_norm")
    opts = launch_options(config)

    def launch(x, residual, weight, eps):
        H = x.shape[-1]
        if H > MAX_H:
            raise ValueError(f"rms_norm: H={H} is wider than one row per program takes ({MAX_H})")
        assert weight.shape == (H,), (weight.shape, H)
        x2 = _rows(x)
        y = torch.empty(x2.shape, dtype=x.dtype if residual is None else
                        torch.result_type(x, residual), device=x.device)
        s = r2 = None
        if residual is not None:
            assert residual.shape == x.shape, (residual.shape, x.shape)
            r2, s = _rows(residual), torch.empty_like(y)
        block_h = triton.next_power_of_2(H)
        o = dict(opts)
        o.setdefault("num_warps", 16 if block_h >= 8192 else 8 if block_h >= 2048 else 4)
        if x2.shape[0]:
            rms_norm_kernel[(x2.shape[0],)](
                x2, r2 if r2 is not None else x2, weight, y, s if s is not None else y, H,
                x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
                s.stride(0) if s is not None else 0, float(eps),
                HAS_RESIDUAL=residual is not None, BLOCK_H=block_h, **o)
        shape = x.shape
        return y.view(shape), (s.view(shape) if s is not None else None)

    return launch


def make_rms_norm(config: dict | None = None):
    """-> rms_norm(x, weight, eps): x [..., H] -> [..., H] in x.dtype."""
    launch = _launcher(config)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return launch(x, None, weight, eps)[0]

    return rms_norm


def make_add_rms_norm(config: dict | None = None):
    """-> add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)."""
    launch = _launcher(config)

    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        return launch(x, residual, weight, eps)

    return add_rms_norm
