"""The reference ops on weight-only quantized weights: dequantize exactly, then the plain op.

Weights are packed (core/quant/format.py's PackedWeight: .data, .scales, .bits, .dtype,
indexable by expert); everything else (norms, router, bias) is a plain tensor. Dequantized
values are q * s in fp32, cast to the activation dtype, so with fp32 activations a quantized
model computes exactly what the fp32 model with dequantized weights computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dequant import dequantize, dequantize_rows
from .moe import grouped_experts, moe_route


def weight(w, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(w.data, w.scales, w.bits).to(dtype)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    return F.linear(x, weight(w, x.dtype))


def embedding(ids: torch.Tensor, w) -> torch.Tensor:
    """Dequantizes only the rows it reads: a tied model keeps one packed table."""
    return dequantize_rows(w.data, w.scales, w.bits, ids).to(w.dtype)


def swiglu_mlp(x: torch.Tensor, w_gate, w_up, w_down) -> torch.Tensor:
    h = F.silu(linear(x, w_gate), inplace=True)
    h.mul_(linear(x, w_up))
    return linear(h, w_down)


def moe_experts(x, topk_weights, topk_ids, w_gate, w_up, w_down) -> torch.Tensor:
    """Packed stacks [E, I, H] / [E, H, I]; the reference moe_experts' order and precision."""
    return grouped_experts(x, topk_weights, topk_ids, len(w_gate),
                           lambda e, xs: swiglu_mlp(xs, w_gate[e], w_up[e], w_down[e]))


def moe(x, router_weight, correction_bias, w_gate, w_up, w_down, top_k: int, norm_min: float, shared=None):
    weights, ids = moe_route(x, router_weight, correction_bias, top_k, norm_min)
    out = moe_experts(x, weights, ids, w_gate, w_up, w_down)
    if shared is not None:
        out = out + swiglu_mlp(x, *shared)
    return out


def prepare_weight(w, role: str | None = None, staged: bool = False):
    """The layout these kernels read: the packed weight itself (read in place, so a staged
    weight, whose buffer is refilled between uses, needs nothing else)."""
    return w
