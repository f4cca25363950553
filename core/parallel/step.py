"""The step description rank 0 broadcasts before every forward: what the other ranks need to run
the same step on their own KV caches — token ids, positions, slot mapping, block tables, context
lengths, query starts, the rows whose logits are wanted, which KV cache (its size) to use, and
which KV caches rank 0 has dropped since the last step (each engine — generate's, the server's —
has its own; the other ranks mirror each one until rank 0 lets it go).

Two broadcasts over a CPU (gloo) group: a fixed header, then one int64 payload. Sampling stays on
rank 0, which alone receives the gathered logits it samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.kvcache import AttentionMetadata

FORWARD, STOP = 1, 0
HEADER = 9   # op, T, B, max_blocks, logit rows (-1: all), kv generation, kv blocks, block size, dropped


@dataclass
class Step:
    ids: torch.Tensor
    meta: AttentionMetadata
    logit_rows: torch.Tensor | None
    kv_generation: int
    kv_blocks: int
    block_size: int
    dropped: list = ()          # KV generations rank 0 no longer has


def send(comm, step: Step) -> None:
    m = step.meta
    T, (B, W) = step.ids.shape[0], m.block_tables.shape
    rows = -1 if step.logit_rows is None else step.logit_rows.numel()
    dropped = list(step.dropped)
    header = torch.tensor([FORWARD, T, B, W, rows, step.kv_generation, step.kv_blocks, step.block_size,
                           len(dropped)], dtype=torch.int64)
    parts = [step.ids, m.slot_mapping, m.positions, m.block_tables.reshape(-1), m.context_lens,
             m.query_start_loc] + ([] if step.logit_rows is None else [step.logit_rows])
    parts.append(torch.tensor(dropped, dtype=torch.int64))
    payload = torch.cat([p.reshape(-1).to("cpu", torch.int64) for p in parts])
    comm.broadcast(header, src=0)
    comm.broadcast(payload, src=0)


def send_stop(comm) -> None:
    comm.broadcast(torch.tensor([STOP] + [0] * (HEADER - 1), dtype=torch.int64), src=0)


def receive(comm, device) -> Step | None:
    """The next step, or None when rank 0 stops the group."""
    header = comm.broadcast(torch.zeros(HEADER, dtype=torch.int64), src=0)
    op, T, B, W, rows, gen, blocks, block_size, n_dropped = header.tolist()
    if op == STOP:
        return None
    sizes = [T, T, T, B * W, B, B + 1, max(rows, 0), n_dropped]
    payload = comm.broadcast(torch.zeros(sum(sizes), dtype=torch.int64), src=0)
    ids, slots, pos, tables, ctx, starts, logit_rows, dropped = torch.split(payload, sizes)
    meta = AttentionMetadata(slot_mapping=slots.to(device), block_tables=tables.reshape(B, W).to(device, torch.int32),
                             context_lens=ctx.to(device, torch.int32),
                             query_start_loc=starts.to(device, torch.int32), positions=pos.to(device))
    return Step(ids=ids.to(device), meta=meta, logit_rows=None if rows < 0 else logit_rows.to(device),
                kv_generation=gen, kv_blocks=blocks, block_size=block_size, dropped=dropped.tolist())
