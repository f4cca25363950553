"""SwiGLU MLP (dense layers, shared experts, and each routed expert)."""

import torch
import torch.nn.functional as F


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), all in x.dtype like HF's Ernie4_5MLP.

    silu and the product run in place on the gate projection: the same values, without two
    more [T, I] temporaries (on CPU those fresh pages cost more than the arithmetic)."""
    h = F.silu(F.linear(x, w_gate), inplace=True)
    h.mul_(F.linear(x, w_up))
    return F.linear(h, w_down)
