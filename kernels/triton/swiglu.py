"""SwiGLU wrappers: `make_swiglu(config)` for the activation alone and `make_swiglu_mlp(config)`
with the reference signature `swiglu_mlp(x, w_gate, w_up, w_down)`.

The three GEMMs stay torch matmuls (cuBLAS/hipBLASLt win on dense shapes); the activation is one
kernel that writes in place over the gate projection, so no extra [T, I] buffer is allocated.
Gate and up are not concatenated into one GEMM: the signature hands over separate weights, and a
copy per call costs more than it saves, while caching one by data pointer would go stale when the
offload engine reuses a buffer for another layer.

Config keys (all optional): BLOCK_N (columns per program, default min(1024, next_pow2(I))),
num_warps, num_stages, and the AMD extras waves_per_eu, matrix_instr_nonkdim, kpack.
"""

import torch
import torch.nn.functional as F
import triton

from ._interpret import AMD_OPTIONS, COMMON_OPTIONS, check_keys, launch_options
from .swiglu_kernels import swiglu_kernel

CONFIG_KEYS = ("BLOCK_N", *COMMON_OPTIONS, *AMD_OPTIONS)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view [rows, N] with unit column stride (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def make_swiglu(config: dict | None = None):
    """-> swiglu(g, u, out=None): silu(g) * u in g.dtype; `out` may be g itself (in place)."""
    config = dict(config or {})
    check_keys(config, CONFIG_KEYS, "swiglu")
    opts = launch_options(config)

    def swiglu(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        assert g.shape == u.shape, (g.shape, u.shape)
        N = g.shape[-1]
        g2, u2 = _rows(g), _rows(u)
        if out is None:
            out = torch.empty_like(g)
        o2 = out.view(-1, N) if out.is_contiguous() else None
        target = o2 if o2 is not None else torch.empty_like(g2)
        rows = g2.shape[0]
        if rows and N:
            block_n = config.get("BLOCK_N") or min(1024, triton.next_power_of_2(N))
            grid = (rows, triton.cdiv(N, block_n))
            swiglu_kernel[grid](g2, u2, target, N, g2.stride(0), u2.stride(0), target.stride(0),
                                BLOCK_N=block_n, **opts)
        if o2 is None:
            out.copy_(target.view(out.shape))
        return out

    return swiglu


def make_swiglu_mlp(config: dict | None = None):
    """-> swiglu_mlp(x, w_gate, w_up, w_down) = down(silu(gate(x)) * up(x)) in x.dtype."""
    swiglu = make_swiglu(config)

    def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
        g = F.linear(x, w_gate)                      # [..., I]
        h = swiglu(g, F.linear(x, w_up), out=g)      # in place over the gate projection
        return F.linear(h, w_down)                   # [..., H]

    return swiglu_mlp
