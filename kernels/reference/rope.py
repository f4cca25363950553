"""Interleaved (GPT-J style) rotary embedding: pairs (2i, 2i+1), NOT the NeoX half split."""

import functools

import torch


@functools.lru_cache(maxsize=32)
def _inv_freq(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # Same fp32 expression as HF's default rope init, so the angles match it bit for bit.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    T, n, d = x.shape
    x32 = x.float().view(T, n, d // 2, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    # (x0 + i x1) * (cos + i sin), written the way HF's rotate_half expands it.
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.view(T, n, d).to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """q [T, nh, d], k [T, nkv, d], positions [T] absolute -> rotated (q, k) in their dtypes."""
    d = q.shape[-1]
    freqs = positions.float()[:, None] * _inv_freq(d, float(theta), q.device)  # [T, d/2]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]                # [T, 1, d/2]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_kv_write(q, k, v, positions, theta, k_cache, v_cache, slot_mapping):
    """Rotate q and k, then write the rotated k and v into the paged cache; returns rotated q.
    GPU backends fuse this into one kernel; here it is the two reference ops in sequence."""
    from .attention import kv_cache_write
    q, k = rope(q, k, positions, theta)
    kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    return q
