"""Quantized linear with int8 activations: the oracle of the opt-in CPU kernel (qgemv_a8.c).

The activations of each row are quantized per block of 32 input columns, d = amax / 127 and
xq = round(x / d) (half to even; d = 0 for an all-zero block), as llama.cpp's Q8_0 does; each
block's dot product with the weight's integers is an exact integer, scaled by d and by the
weight's group scale:
    y[t, n] = sum_b d[t, b] * (sum_{k in b} xq[t, k] * q[n, k]) * s[n, group(b)]
A block sum is at most 32 * 127 * 128 < 2**24, so it is exact in fp32 whatever the order; only the
final sum over blocks depends on it.
"""

from __future__ import annotations

import torch

from .dequant import int_values

BLOCK = 32


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (K a multiple of 32) -> (xq [T, K] fp32 holding integers in [-127, 127], d [T, K / 32])."""
    T, K = x.shape
    v = x.float().reshape(T, K // BLOCK, BLOCK)
    d = v.abs().amax(-1) / 127
    inv = torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))
    q = torch.round(v * inv.unsqueeze(-1))
    return q.reshape(T, K), d


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x [..., K] times a packed weight w [N, K] (.data, .scales, .bits) -> [..., N] in x.dtype."""
    K = x.shape[-1]
    xq, d = quantize_activations(x.reshape(-1, K))
    T, nb = d.shape
    q = int_values(w.data, w.bits).float()
    N = q.shape[0]
    sums = torch.einsum("tbi,nbi->tnb", xq.view(T, nb, BLOCK), q.view(N, nb, BLOCK))
    s = w.scales.float().repeat_interleave(nb // w.scales.shape[-1], dim=-1)     # [N, blocks]
    y = (sums * d.unsqueeze(1) * s.unsqueeze(0)).sum(-1)
    return y.to(x.dtype).view(*x.shape[:-1], N)
