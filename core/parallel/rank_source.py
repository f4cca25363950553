"""Reading one rank's slices for the staging engine (core/memory/offload.py).

`RankCheckpoint` answers `ref(name)` with the rank's part of a checkpoint tensor (its packed
integers and fp32 scales alike): a `SliceRef` of the shard's shape. `RankReader` reads those:
- a row range (column-parallel q/k/v, gate/up; the vocabulary rows) is one span of the file:
  pread straight into place, chunk by chunk, its pages released, as for a whole tensor;
- a column range (row-parallel o, down) is one span per row: gathered through
  Checkpoint.read_slice (a strided copy over the mapping, touching only those rows' pages;
  the tensor's pages are dropped after), on a discrete device into a host buffer, then copied;
- vocabulary padding rows (the last rank's, when N does not divide the vocabulary) are zeros
  (packed: q = 0 bytes, s = 0, which dequantize to 0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..memory.offload import FileReader
from ..model.checkpoint_reader import Checkpoint, TensorRef
from ..quant.checkpoint import SCALE_SUFFIX
from .layout import RankLayout


@dataclass(frozen=True)
class SliceRef(TensorRef):
    """Rank's part of checkpoint tensor `whole`: `dim` [start, stop), held as `shape` (rows
    past stop - start on dim 0 are zero padding). `offset` is the first row's (dim 0)."""
    whole: TensorRef = None
    dim: int = 0
    start: int = 0
    stop: int = 0

    @property
    def padded(self) -> bool:
        return self.dim == 0 and self.shape[0] > self.stop - self.start

    @property
    def real_nbytes(self) -> int:
        """Bytes of the rows the file holds (dim 0)."""
        return self.whole.nbytes // self.whole.shape[0] * (self.stop - self.start)


class RankCheckpoint:
    """The checkpoint as one rank sees it: `ref` gives the rank's slices; `config`, `path` and
    `has` are the checkpoint's."""

    def __init__(self, ckpt: Checkpoint, lay: RankLayout, quant=None):
        self.ckpt, self.lay, self.quant = ckpt, lay, quant
        self.config, self.path = ckpt.config, ckpt.path

    def has(self, name: str) -> bool:
        return self.ckpt.has(name)

    def ref(self, name: str) -> TensorRef:
        whole = self.ckpt.ref(name)
        scales = name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in self.lay.shards
        s = self.lay.shards[name[:-len(SCALE_SUFFIX)] if scales else name]
        if s.dim is None:
            return whole
        if s.dim == 0:
            shape = (s.shape[0],) + tuple(whole.shape[1:])
            return _slice(whole, 0, s.start, s.stop, shape)
        if self.quant is None or whole.dtype.is_floating_point and not scales:
            start, stop = s.start, s.stop                       # a float tensor's columns
        elif scales:
            if self.quant.group_size == -1:
                return whole                                    # per channel: the whole row's scale
            start, stop = s.start // self.quant.group_size, s.stop // self.quant.group_size
        else:
            per_byte = 8 // self.quant.bits                     # packed integers (wint4: two a byte)
            start, stop = s.start // per_byte, s.stop // per_byte
        return _slice(whole, 1, start, stop, tuple(whole.shape[:1]) + (stop - start,))


def _slice(whole: TensorRef, dim: int, start: int, stop: int, shape: tuple) -> SliceRef:
    row = whole.nbytes // whole.shape[0]
    offset = whole.offset + (start * row if dim == 0 else 0)
    return SliceRef(whole.name, whole.file, offset, math.prod(shape) * whole.dtype.itemsize, tuple(shape),
                    whole.dtype, whole=whole, dim=dim, start=start, stop=stop)


class RankReader(FileReader):
    """FileReader over a RankCheckpoint's slices (see the module doc)."""

    def __init__(self, ckpt: RankCheckpoint):
        super().__init__(ckpt.ckpt)

    def contiguous(self, ref: TensorRef) -> bool:
        return not isinstance(ref, SliceRef) or (ref.dim == 0 and not ref.padded)

    def read_into(self, ref: TensorRef, dst: torch.Tensor) -> None:
        if not isinstance(ref, SliceRef):
            return super().read_into(ref, dst)
        if ref.dim == 0:
            flat, real = dst.reshape(-1), ref.real_nbytes // ref.dtype.itemsize
            rows = TensorRef(ref.name, ref.file, ref.offset, ref.real_nbytes, (real,), ref.dtype)
            super().read_into(rows, flat[:real])
            flat[real:].zero_()
            return
        t0 = time.perf_counter()
        self.ckpt.read_slice(ref.name, dst.view(ref.shape), 1, ref.start, ref.stop, release=True)
        with self._lock:
            self.bytes += ref.nbytes
            self.seconds += time.perf_counter() - t0

    def read_rows(self, ref: TensorRef, rows: list, dst: torch.Tensor) -> None:
        if not isinstance(ref, SliceRef):
            return super().read_rows(ref, rows, dst)
        real = ref.stop - ref.start
        for j, r in enumerate(rows):          # a step's few rows; padding rows are zeros
            if r < real:
                super().read_rows(ref.whole, [ref.start + r], dst[j:j + 1])
            else:
                dst[j].zero_()
