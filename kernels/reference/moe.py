"""Mixture of experts with HF's routing: fp32 softmax, bias for selection only, renormalised."""

import torch
import torch.nn.functional as F

from .mlp import swiglu_mlp


def moe_route(x: torch.Tensor, router_weight: torch.Tensor, correction_bias, top_k: int,
              norm_min: float):
    """x [T, H], router_weight fp32 [E, H] -> (weights [T, k] in x.dtype, ids [T, k] int64)."""
    probs = F.softmax(F.linear(x.float(), router_weight.float()), dim=-1)   # [T, E] fp32
    score = probs if correction_bias is None else probs + correction_bias.float().reshape(-1)
    ids = torch.topk(score, top_k, dim=-1).indices                          # [T, k]
    w = probs.gather(-1, ids)                                               # unbiased probs
    w = w / torch.clamp(w.sum(-1, keepdim=True), min=norm_min)
    return w.to(x.dtype), ids


def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x [T, H]; w_gate/w_up [E, I, H], w_down [E, H, I] -> [T, H] in x.dtype.

    Per expert in index order: SwiGLU of its tokens in x.dtype, times the x.dtype weight,
    index_add_ into an x.dtype buffer — the order and precision HF uses.
    """
    E = w_gate.shape[0]
    return grouped_experts(x, topk_weights, topk_ids, E,
                           lambda e, xs: swiglu_mlp(xs, w_gate[e], w_up[e], w_down[e]))


def grouped_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                    expert_mlp) -> torch.Tensor:
    """The routed sum with expert_mlp(e, x_rows) per expert: shared by the plain and quantized ops."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)                                   # [T*k], entry = t*k + j
    order = torch.argsort(flat, stable=True)                      # grouped by expert
    tokens = order // k                                           # [T*k] token of each entry
    weights = topk_weights.reshape(-1)[order].to(x.dtype)[:, None]
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync per layer
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = tokens[start:start + n]
        y = expert_mlp(e, x[tok])
        out.index_add_(0, tok, y * weights[start:start + n])
        start += n
    return out


def moe(x: torch.Tensor, router_weight: torch.Tensor, correction_bias, w_gate: torch.Tensor,
        w_up: torch.Tensor, w_down: torch.Tensor, top_k: int, norm_min: float,
        shared=None) -> torch.Tensor:
    """Routed experts plus, when given, a shared SwiGLU (g, u, d) added with weight 1."""
    weights, ids = moe_route(x, router_weight, correction_bias, top_k, norm_min)
    out = moe_experts(x, weights, ids, w_gate, w_up, w_down)
    if shared is not None:
        out = out + swiglu_mlp(x, *shared)
    return out
