"""A rank's slice of a weight-only quantized weight (core/quant), equal to the same rows or columns
of the weight one process would hold: read from a quantized checkpoint (`ernie-hal quantize`:
packed integers + fp32 scales, each sliced), or quantized at load from the rank's float slice.

- Rows (column-parallel q/k/v, gate/up; the vocabulary-parallel embedding and head): scales are
  per row, so quantizing a rank's rows gives exactly those rows of the whole; vocabulary padding
  rows are q = 0, s = 0 (they dequantize to 0).
- Columns (row-parallel o and down): with groups, each shard holds whole groups (layout.check
  refuses otherwise) and quantizes as the whole does. Per channel, a row's one scale spans every
  rank's columns: each rank takes max|w| of its columns, the ranks all-reduce the max (exact: a max
  does not round) and quantize with it, so every rank's q and s are the one-process values. A
  quantized checkpoint's per-channel scales are whole-row already: each rank reads them all.
"""

from __future__ import annotations

import torch

from ..quant.checkpoint import quantize_from, scale_name
from ..quant.format import PackedWeight, empty_packed
from ..quant.quantize import block_rows, group_amax, quantize_rows_into
from .layout import Shard

ZERO_CODE = {8: 0, 4: 0x88}        # the stored byte of q = 0 (wint4: offset binary, two per byte)


def alloc_packed(ref, shape, dtype: torch.dtype, alloc, padded: bool = False) -> PackedWeight:
    """Storage for a packed weight of logical `shape`; `padded`: every row starts as q = 0, s = 0."""
    pw = empty_packed(ref.quant, shape, dtype, alloc)
    if padded:
        pw.data.fill_(ZERO_CODE[ref.quant.bits])
        pw.scales.zero_()
    return pw


def rows(pw: PackedWeight, n: int) -> PackedWeight:
    """The first n rows of a 2-D packed weight (views of its storage)."""
    return PackedWeight(pw.data[:n], pw.scales[:n], pw.spec, (n,) + tuple(pw.shape[1:]), pw.dtype)


def read_shard(ckpt, ref, shard: Shard, stored: bool, reduce_max, out: PackedWeight) -> PackedWeight:
    """Fill `out` (the shard's rows stop - start, its columns) with the rank's part of `ref`.
    stored: the checkpoint holds it packed. reduce_max(t): t's elementwise max over the ranks,
    in place (row-parallel per-channel weights quantized at load need the whole row's max)."""
    if stored:
        _read_stored(ckpt, ref, shard, out)
        return out
    if shard.dim is None:
        quantize_from(ckpt, ref, out)
    elif shard.dim == 0:
        _quantize_rows(ckpt, ref, shard, out)
    else:
        # a column range spans every row: read the rank's columns once, quantize by row blocks
        spec, w = ref.quant, _read_float(ckpt, ref, shard)
        amax = None
        if spec.group_size == -1:
            step = block_rows(w.shape[-1])
            amax = reduce_max(torch.cat([group_amax(w[r:r + step], spec) for r in range(0, w.shape[0], step)]))
        quantize_rows_into(w, out, amax=amax)
    return out


def _quantize_rows(ckpt, ref, shard: Shard, out: PackedWeight) -> None:
    """The rank's rows, a block at a time (one float block held, its file pages dropped after)."""
    n, step = shard.stop - shard.start, block_rows(ref.shape[-1])
    buf = torch.empty((min(step, n),) + tuple(ref.shape[1:]), dtype=ckpt.ref(ref.name).dtype)
    for r in range(0, n, step):
        block = buf[:min(step, n - r)]
        ckpt.read_slice(ref.name, block, 0, shard.start + r, shard.start + r + block.shape[0], release=True)
        quantize_rows_into(block, out, r)


def _read_float(ckpt, ref, shard: Shard) -> torch.Tensor:
    """The rank's columns of the float tensor, on the host in the checkpoint's dtype."""
    shape = list(ref.shape)
    shape[shard.dim] = shard.stop - shard.start
    w = torch.empty(shape, dtype=ckpt.ref(ref.name).dtype)
    return ckpt.read_slice(ref.name, w, shard.dim, shard.start, shard.stop, release=True)


def _read_stored(ckpt, ref, shard: Shard, out: PackedWeight) -> None:
    spec, scales = ref.quant, scale_name(ref.name)
    if shard.dim is None:
        ckpt.read(ref.name, out=out.data, release=True)
        ckpt.read(scales, out=out.scales, release=True)
    elif shard.dim == 0:
        ckpt.read_slice(ref.name, out.data, 0, shard.start, shard.stop, release=True)
        ckpt.read_slice(scales, out.scales, 0, shard.start, shard.stop, release=True)
    else:
        per_byte = 8 // spec.bits                 # wint4: two columns a byte (shards cut at even columns)
        ckpt.read_slice(ref.name, out.data, 1, shard.start // per_byte, shard.stop // per_byte, release=True)
        if spec.group_size == -1:                 # the whole row's scale
            ckpt.read(scales, out=out.scales, release=True)
        else:
            g = spec.group_size
            ckpt.read_slice(scales, out.scales, 1, shard.start // g, shard.stop // g, release=True)
