"""Projection and embedding lookup: thin names over torch so every op has a table entry."""

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w[out, in].T -> [..., out]."""
    return F.linear(x, w)


def embedding(ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ids [T] -> w[ids] [T, H]; no scaling (ERNIE adds nothing to the lookup)."""
    return F.embedding(ids, w)
