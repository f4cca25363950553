"""quantize: a float weight -> PackedWeight, the issue's exact scheme (core/quant/scheme.py).

Works on any slice of rows (a shard, one expert, one tensor of a stack), since scales are per row
and groups never cross rows; a column slice keeps its groups when it starts and ends on a group
boundary (tensor-parallel shards of a row-parallel weight must cut there). A column slice inside
one group (a per-channel weight split over ranks) quantizes as the whole does when it is given the
group's `amax` (the max over every rank's part: core/parallel/packed.py all-reduces it).

Rows are quantized a block at a time (`block_rows`): the fp32 upcast and its temporaries cover
one block, never the whole tensor (the 103424 x 1024 embedding is 0.4 GB in fp32). Each row is
computed alone, so blocks give exactly the values of one pass over the whole tensor.
"""

from __future__ import annotations

import torch

from ...kernels.reference.dequant import pack_int4
from .format import PackedWeight, empty_packed
from .scheme import QuantSpec

BLOCK_VALUES = 1 << 18     # values per block: 1 MiB for each fp32 temporary


def block_rows(cols: int) -> int:
    """Rows of `cols` values quantized together."""
    return max(1, BLOCK_VALUES // max(cols, 1))


def group_amax(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """max|w| per row and group, fp32 [..., out, groups]."""
    *lead, cols = w.shape
    g = spec.groups(cols)
    return w.float().reshape(*lead, g, cols // g).abs().amax(dim=-1)


def quantize_values(w: torch.Tensor, spec: QuantSpec, amax: torch.Tensor | None = None) -> tuple:
    """(q int8 [..., out, in], scales fp32 [..., out, groups]) of `w`, computed in fp32.
    `amax`: each group's max|w| when `w` holds only part of its groups' columns (else w's own)."""
    w = w.float()
    *lead, cols = w.shape
    g = spec.groups(cols)
    wg = w.reshape(*lead, g, cols // g)
    s = (wg.abs().amax(dim=-1) if amax is None else amax.float()) / spec.qmax  # [..., out, g]
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(wg / safe.unsqueeze(-1))                                  # round half to even
    q = q.clamp_(-spec.qmax, spec.qmax).masked_fill_((s == 0).unsqueeze(-1), 0)
    return q.to(torch.int8).reshape(w.shape), s


def pack(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The stored integers of q: int8 itself (wint8) or two per byte (wint4)."""
    return q if spec.bits == 8 else pack_int4(q)


def quantize_rows_into(w: torch.Tensor, out: PackedWeight, start: int = 0,
                       amax: torch.Tensor | None = None) -> None:
    """Quantize the rows `w` ([n, in] or a stack, any float dtype) into rows [start, start + n)
    of `out` (whose data/scales flatten to rows: a weight, or a stack of them)."""
    cols = w.shape[-1]
    data = out.data.view(-1, out.data.shape[-1])        # view: a copy would drop the writes
    scales = out.scales.view(-1, out.scales.shape[-1])
    w = w.reshape(-1, cols)
    if amax is not None:
        amax = amax.reshape(-1, amax.shape[-1])
    step = block_rows(cols)
    for r in range(0, w.shape[0], step):
        q, s = quantize_values(w[r:r + step], out.spec, None if amax is None else amax[r:r + step])
        n = q.shape[0]
        data[start + r:start + r + n].copy_(pack(q, out.spec))
        scales[start + r:start + r + n].copy_(s)


def quantize(w: torch.Tensor, spec: QuantSpec, dtype: torch.dtype | None = None,
             name: str = "weight", out: PackedWeight | None = None,
             amax: torch.Tensor | None = None) -> PackedWeight:
    """PackedWeight of `w` ([..., out, in]); `dtype` the model's compute dtype (default w's).
    `out`: write into its data/scales (device storage allocated by the loader). `amax`: as in
    quantize_values."""
    spec.check(name, tuple(w.shape))
    if out is None:
        out = empty_packed(spec, tuple(w.shape), dtype or w.dtype,
                           lambda s, d: torch.empty(s, dtype=d, device=w.device))
    quantize_rows_into(w, out, amax=amax)
    return out


def dequantize(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return pw.dequantize(dtype)
