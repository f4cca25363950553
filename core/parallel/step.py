"""The step description rank 0 broadcasts before every forward: what the other ranks need to run
the same step on their own KV caches — token ids, positions, slot mapping, block tables, context
lengths, query starts, the rows whose logits are wanted, and which KV cache (its size) to use.

Two broadcasts over a CPU (gloo) group: a fixed header, then one int64 payload. Sampling stays on
rank 0, which alone receives the gathered logits it samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.kvcache import AttentionMetadata

FORWARD, STOP = 1, 0
HEADER = 8   # op, T, B, max_blocks, logit rows (-1: all), kv generation, kv blocks, block size


@dataclass
class Step:
    ids: torch.Tensor
    meta: AttentionMetadata
    logit_rows: torch.Tensor | None
    kv_generation: int
    kv_blocks: int
    block_size: int


def send(comm, step: Step) -> None:
    m = step.meta
    T, (B, W) = step.ids.shape[0], m.block_tables.shape
    rows = -1 if step.logit_rows is None else step.logit_rows.numel()
    header = torch.tensor([FORWARD, T, B, W, rows, step.kv_generation, step.kv_blocks, step.block_size],
                          dtype=torch.int64)
    parts = [step.ids, m.slot_mapping, m.positions, m.block_tables.reshape(-1), m.context_lens,
             m.query_start_loc] + ([] if step.logit_rows is None else [step.logit_rows])
    payload = torch.cat([p.reshape(-1).to("cpu", torch.int64) for p in parts])
    comm.broadcast(header, src=0)
    comm.broadcast(payload, src=0)


def send_stop(comm) -> None:
    comm.broadcast(torch.tensor([STOP] + [0] * (HEADER - 1), dtype=torch.int64), src=0)


def receive(comm, device) -> Step | None:
    """The next step, or None when rank 0 stops the group."""
    header = comm.broadcast(torch.zeros(HEADER, dtype=torch.int64), src=0)
    op, T, B, W, rows, gen, blocks, block_size = header.tolist()
    if op == STOP:
        return None
    n = 3 * T + B * W + B + (B + 1) + max(rows, 0)
    payload = comm.broadcast(torch.zeros(n, dtype=torch.int64), src=0)
    sizes = [T, T, T, B * W, B, B + 1, max(rows, 0)]
    ids, slots, pos, tables, ctx, starts, logit_rows = torch.split(payload, sizes)
    meta = AttentionMetadata(slot_mapping=slots.to(device), block_tables=tables.reshape(B, W).to(device, torch.int32),
                             context_lens=ctx.to(device, torch.int32),
                             query_start_loc=starts.to(device, torch.int32), positions=pos.to(device))
    return Step(ids=ids.to(device), meta=meta, logit_rows=None if rows < 0 else logit_rows.to(device),
                kv_generation=gen, kv_blocks=blocks, block_size=block_size)
