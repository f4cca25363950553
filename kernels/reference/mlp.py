"""SwiGLU MLP (dense layers, shared experts, and each routed expert)."""

import torch
import torch.nn.functional as F


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), all in x.dtype like HF's Ernie4_5MLP."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
