"""PackedWeight: one weight-only quantized tensor (or a stack of them: routed experts).

  data    wint8: int8 [..., out, in]; wint4: uint8 [..., out, in / 2], two values per byte,
          offset binary (q + 8), low nibble = even column (kernels/reference/dequant.py)
  scales  fp32 [..., out, in / group_size] (one column when per channel)
  shape   the logical [..., out, in]; dtype: the dtype the model computes in (what a lookup and
          the reference kernels dequantize to)
  native  what the kernel table's prepare_weight binds once at load: on cpu a GEMM closure (over
          data/scales as stored, or over torch's int4pack copy without the native library); None
          where the kernels read data/scales directly

Groups run along the input dimension and scales are per row, so fusing projections (q/k/v,
gate/up) is a row concatenation of data and scales (`cat_rows`), and a row slice (a tensor-parallel
shard) is a slice of both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ...kernels.reference.dequant import dequantize as _dequantize
from .scheme import QuantSpec


@dataclass
class PackedWeight:
    data: torch.Tensor
    scales: torch.Tensor
    spec: QuantSpec
    shape: tuple
    dtype: torch.dtype
    native: object = field(default=None, repr=False)
    # a part of a fused weight (`rows`): the fused PackedWeight, prepared, and where its rows start
    parent: "PackedWeight | None" = field(default=None, repr=False)
    row0: int = 0

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    @property
    def scheme(self) -> str:
        return self.spec.scheme

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """q * s in fp32, then cast to `dtype`."""
        return _dequantize(self.data, self.scales, self.bits).to(dtype)

    def __getitem__(self, i) -> "PackedWeight":
        """One weight of a stack (expert i of [E, out, in])."""
        native = self.native[i] if isinstance(self.native, (list, tuple)) else None
        parent = None if self.parent is None else self.parent[i]
        return PackedWeight(self.data[i], self.scales[i], self.spec, tuple(self.shape[1:]), self.dtype, native,
                            parent, self.row0)

    def rows(self, start: int, stop: int) -> "PackedWeight":
        """Rows [start, stop) of each weight (dim -2) as a view: one part of a fused weight, the
        same values as that part quantized alone. data and scales are sliced where the backend
        kept them (prepare_weight may hold its own layout in `native` instead); `parent` is this
        weight, so a kernel can run one projection for adjacent parts."""
        def part(t):
            return t.narrow(-2, start, stop - start) if t.dim() >= 2 and t.shape[-2] == self.shape[-2] else t
        return PackedWeight(part(self.data), part(self.scales), self.spec,
                            tuple(self.shape[:-2]) + (stop - start, self.shape[-1]), self.dtype, None, self, start)

    def split_rows(self, sizes) -> tuple:
        """Consecutive row parts of these sizes (a fused [q; k; v] or [gate; up])."""
        out, at = [], 0
        for n in sizes:
            out.append(self.rows(at, at + n))
            at += n
        return tuple(out)

    def __len__(self) -> int:
        return self.shape[0]

    def with_native(self, native) -> "PackedWeight":
        return replace(self, native=native)

    def to(self, device) -> "PackedWeight":
        return PackedWeight(self.data.to(device), self.scales.to(device), self.spec, self.shape, self.dtype)


def cat_rows(parts: list) -> PackedWeight:
    """Row-concatenation of packed weights of one scheme (fused q/k/v or gate/up projections)."""
    first = parts[0]
    if any(p.spec != first.spec or p.shape[-1] != first.shape[-1] for p in parts):
        raise ValueError("cat_rows: parts need one scheme, group size and input width")
    data = torch.cat([p.data for p in parts], dim=-2)
    scales = torch.cat([p.scales for p in parts], dim=-2)
    return PackedWeight(data, scales, first.spec, tuple(data.shape[:-1]) + first.shape[-1:], first.dtype)


def empty_packed(spec: QuantSpec, shape, dtype: torch.dtype, alloc=None) -> PackedWeight:
    """Uninitialized storage for a weight of logical `shape` (alloc(shape, dtype) -> tensor)."""
    alloc = alloc or (lambda s, d: torch.empty(s, dtype=d))
    *lead, cols = shape
    if spec.bits == 8:
        data = alloc(tuple(lead) + (cols,), torch.int8)
    else:
        data = alloc(tuple(lead) + (cols // 2,), torch.uint8)
    scales = alloc(tuple(lead) + (spec.groups(cols),), torch.float32)
    return PackedWeight(data, scales, spec, tuple(shape), dtype)
