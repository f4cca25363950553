"""Communicator: the collectives a tensor-parallel rank needs, on torch.distributed.

A backend hands one out (`Backend.communicator`) over a process group whose collective backend
its Capabilities name (gloo on cpu, NCCL on CUDA, RCCL through the NCCL API on ROCm). The
executor receives `all_reduce` and `gather` (the logits, to rank 0 only) through its kernel table,
so the graph and the kernels never see a process group; a single-process model binds neither (no
collectives at all).

Collective backends: gloo implements every call here on CPU tensors. NCCL (and RCCL through the
NCCL API) implements all_reduce, all_gather and broadcast natively; `gather` runs over its
point-to-point send/recv (torch >= 1.11), each rank sending one buffer to `dst`: fine for a
step's logits, and capturable in a device graph like any NCCL call (what decode graphs under
tensor parallel would need, with the step broadcast moved off the host).
"""

from __future__ import annotations

import torch


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died or timed out."""


class Communicator:
    def __init__(self, rank: int, world_size: int, group=None):
        self.rank, self.world_size, self.group = rank, world_size, group

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or "max") over ranks, in place; returns `t`."""
        import torch.distributed as dist
        _run(dist.all_reduce, t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return t

    def gather(self, t: torch.Tensor, dim: int = -1, dst: int = 0) -> torch.Tensor | None:
        """Every rank's `t` (same shape on all), concatenated along `dim` in rank order, on rank
        `dst` only; the other ranks get None (they send, and hold no copy of the whole)."""
        import torch.distributed as dist
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == dst else None
        _run(dist.gather, t, parts, dst=dst, group=self.group)
        return None if parts is None else torch.cat(parts, dim=dim)

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `t` (same shape on all), concatenated along `dim` in rank order."""
        import torch.distributed as dist
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        _run(dist.all_gather, parts, t, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `t` into every rank's `t` (same shape and dtype), in place."""
        import torch.distributed as dist
        _run(dist.broadcast, t, src=src, group=self.group)
        return t


def _run(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:   # gloo/NCCL report a dead peer or a timeout as RuntimeError
        raise CollectiveError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
