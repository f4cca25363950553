"""SwiGLU MLP on packed weights (dense MLP layers and shared experts of a quantized model):
`make_swiglu_mlp_wint(config)` -> swiglu_mlp(x, w_gate, w_up, w_down), the reference signature
(kernels/reference/quantized.py), PackedWeights in, x.dtype out.

Three packed linears (wlinear.py: integers dequantized in registers, GEMV or GEMM tiles by row
count) and the SwiGLU activation kernel in place over the gate projection (swiglu.py), so the
rounding is the reference's: gate and up rounded to x.dtype, silu rounded, product rounded.

Config keys (all optional): the packed linear's ("gemv", "gemm", "GEMV_MAX_ROWS": a backend binds
this op with its linear.wint* config) and "swiglu", the activation kernel's (BLOCK_N, num_warps...).
"""

import torch

from .swiglu import make_swiglu
from .wlinear import make_linear_wint


def make_swiglu_mlp_wint(config: dict | None = None):
    config = dict(config or {})
    swiglu = make_swiglu(config.pop("swiglu", None))
    linear = make_linear_wint(config)

    def swiglu_mlp(x: torch.Tensor, w_gate, w_up, w_down) -> torch.Tensor:
        g = linear(x, w_gate)                          # [..., I]
        h = swiglu(g, linear(x, w_up), out=g)          # in place over the gate projection
        return linear(h, w_down)                       # [..., H]

    return swiglu_mlp
