"""RMSNorm as Hugging Face writes it: fp32 statistics, cast back, then the weight multiply."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> [T, H] in x.dtype. `weight * y` happens after the cast, as in HF."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * y.to(x.dtype)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(normed, summed): the residual add stays in x.dtype (HF adds in bf16)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed
