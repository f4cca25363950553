"""Weight-only dequantization, exactly: the oracle every quantized kernel is checked against.

The format (core/quant/format.py documents it; these functions take its plain tensors):
  wint8  data int8  [..., out, in]       q in [-127, 127]
  wint4  data uint8 [..., out, in / 2]   two values per byte, offset binary (q + 8): the low nibble
                                         holds the even column, the high nibble the odd one
  scales fp32 [..., out, groups]         groups = in / group_size (1 when per channel)
Dequantized value: q * s in fp32, s the scale of the value's row and group of input columns.
"""

from __future__ import annotations

import torch


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> int8 [..., n] in [-8, 7] (even columns from the low nibbles)."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int [..., n] in [-8, 7], n even -> uint8 [..., n/2]; the inverse of unpack_int4."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def int_values(data: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer values q [..., out, in] of packed data (int8)."""
    return unpack_int4(data) if bits == 4 else data


def dequantize(data: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 [..., out, in] = q * s, each scale repeated over its group of input columns."""
    q = int_values(data, bits).float()
    groups = scales.shape[-1]
    shape = q.shape
    q = q.reshape(*shape[:-1], groups, shape[-1] // groups)
    return (q * scales.float().unsqueeze(-1)).reshape(shape)


def dequantize_rows(data: torch.Tensor, scales: torch.Tensor, bits: int, rows: torch.Tensor) -> torch.Tensor:
    """fp32 [len(rows), in]: only the rows a lookup reads (an embedding keeps one packed copy)."""
    return dequantize(data.index_select(0, rows), scales.index_select(0, rows), bits)
