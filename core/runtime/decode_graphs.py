"""Decode steps replayed from captured device graphs (CUDA graphs; hipGraphs on ROCm).

A decode step of a small batch launches several hundred short kernels; on a GPU their launch
cost, not memory bandwidth, then bounds time per token. Capturing the forward once per padded
batch size and replaying it removes that cost, as vLLM and SGLang do. The graph ends at the
final norm; the head GEMM runs after the replay on the real rows only.

What a replay sees must live at fixed addresses, so every step's inputs are copied into static
buffers: token ids, positions, KV slots, block tables (full width for the engine's longest
sequence), context lengths. A batch is padded up to the next captured size; padded rows write
their K/V into a scratch block no sequence owns and attend over that one token, and their logits
are dropped. Graphs are captured lazily, the first time a size is needed, against one KVCache
(the engine unbinds before it reallocates the cache and binds the new one after). Each bind takes
a fresh graph pool from the backend: the graphs of the old pool are freed with the old cache,
and PyTorch's allocator asserts when one captures into a pool whose graphs are gone.
`capture_all` captures the largest size first, so the smaller graphs reuse its pool memory.

Graphs are used only where they can be right: the backend says it can capture
(`caps.graphs`), every weight is resident (a staged store does host work per layer), and the
capture itself succeeds: an op that waits for the host (the reference MoE counts tokens per
expert on the host) makes capture fail, and decode then stays eager with the reason recorded.
"""

from __future__ import annotations

import logging

import torch

from .kvcache import AttentionMetadata, KVCache

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> tuple:
    """1, 2, 4, 8, then every multiple of 8 (vLLM's default ladder), up to the first size that
    holds max_batch: a batch pads by at most 7 rows."""
    ladder = [1, 2, 4] + list(range(8, max(1, max_batch) + 8, 8))
    top = next(s for s in ladder if s >= max_batch)
    return tuple(s for s in ladder if s <= top)


class DecodeGraphs:
    """Captured decode forwards for one model, keyed by padded batch size."""

    def __init__(self, model, max_batch: int, max_model_len: int, block_size: int):
        self.model, self.backend = model, model.backend
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.width = -(-max_model_len // block_size)       # block-table columns
        self.block_size = block_size
        self.kv: KVCache | None = None
        self.disabled: str | None = None                   # why graphs are off, once they are
        self.graphs: dict = {}                             # padded size -> (replay, hidden)
        self.pool = None                                   # the bound cache's graph pool
        self.replays = 0
        self.eager_steps = 0                               # decode steps that could not replay
        self.binds = 0

    def metrics(self) -> dict:
        """Counters a server exports: a silent fallback to eager shows up here, not only in a log."""
        return {"decode_graphs_on": self.disabled is None, "decode_graph_replays": self.replays,
                "decode_graph_eager_steps": self.eager_steps, "decode_graphs_captured": len(self.graphs),
                "decode_graph_binds": self.binds, "decode_graphs_off_reason": self.disabled or ""}

    # ---- binding -----------------------------------------------------------------------------
    def unbind(self) -> None:
        """Drop every reference to the bound cache (its graphs, static buffers and pool), so the
        engine can free it before allocating a bigger one: never both at once."""
        self.graphs.clear()
        self.kv = self.pool = None
        for name in ("ids", "positions", "slots", "block_tables", "context_lens", "query_start_loc"):
            self.__dict__.pop(name, None)

    def bind(self, kv: KVCache) -> None:
        """Use `kv` from now on: drop graphs captured against an older cache, take a fresh graph
        pool, and take one block of this cache as the scratch block for padded rows."""
        self.unbind()
        self.kv = kv
        self.pool = self.backend.graph_pool()
        self.binds += 1
        self.scratch_block = kv.allocator.allocate(1)[0]
        dev, B = self.backend.device, self.max_batch
        zeros = lambda *shape, dtype: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        self.ids = zeros(B, dtype=torch.long)
        self.positions = zeros(B, dtype=torch.long)
        self.slots = zeros(B, dtype=torch.long)
        self.block_tables = zeros(B, self.width, dtype=torch.int32)
        self.context_lens = zeros(B, dtype=torch.int32)
        self.query_start_loc = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self._pad_rows(0)

    def _pad_rows(self, start: int) -> None:
        """Rows from `start` on: one token at position 0 in the scratch block."""
        self.ids[start:].zero_()
        self.positions[start:].zero_()
        self.slots[start:].fill_(self.scratch_block * self.block_size)
        self.block_tables[start:].fill_(self.scratch_block)
        self.context_lens[start:].fill_(1)

    def padded_size(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    # ---- one decode step ---------------------------------------------------------------------
    def run(self, ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor | None:
        """Logits [B, vocab] float32 for a decode step (one new token per sequence), or None when
        this step cannot replay (graphs off, batch too large, blocks beyond the captured width);
        the caller then runs the eager forward."""
        B = ids.shape[0]
        size = self.padded_size(B)
        if (self.disabled or size is None or kv is not self.kv
                or meta.block_tables.shape[1] > self.width):
            self.eager_steps += 1
            return None
        entry = self.graphs.get(size)
        if entry is None:
            entry = self._capture(size)
            if entry is None:
                self.eager_steps += 1
                return None
        self.ids[:B].copy_(ids)
        self.positions[:B].copy_(meta.positions)
        self.slots[:B].copy_(meta.slot_mapping)
        w = meta.block_tables.shape[1]
        self.block_tables[:B, :w].copy_(meta.block_tables)
        self.block_tables[:B, w:].zero_()     # beyond a row's context: masked, but kept in range
        self.context_lens[:B].copy_(meta.context_lens)
        self._pad_rows(B)
        replay, hidden = entry
        replay()
        self.replays += 1
        # the head GEMM runs outside the graph on the real rows only: a captured [size, vocab]
        # output per batch size would pin ~0.4 MB per row of every size in the graph pool
        return self.model.project(hidden[:B], self.head)

    def _capture(self, size: int):
        self._pad_rows(0)     # capture and its warm-up write only into the scratch block
        meta = AttentionMetadata(slot_mapping=self.slots[:size], block_tables=self.block_tables[:size],
                                 context_lens=self.context_lens[:size],
                                 query_start_loc=self.query_start_loc[:size + 1],
                                 positions=self.positions[:size])
        ids, kv, model = self.ids[:size], self.kv, self.model
        self.head = model.weights.output()[1]        # resident: the same tensor every step
        try:
            entry = self.backend.capture_graph(lambda: model.hidden_states(ids, meta, kv)[0], self.pool)
        except Exception as e:  # noqa: BLE001 - any failure means: stay eager, say why
            self.disabled = f"capture failed at batch {size}: {type(e).__name__}: {e}"
            # an error, not a warning: every later decode step runs eager (launch-bound on a GPU)
            log.error("decode graphs off for the rest of this process, decode runs eager: %s", self.disabled)
            return None
        self.graphs[size] = entry
        return entry

    def capture_all(self) -> int:
        """Capture every size now (a server does this at start, as vLLM does, so no request
        waits for a capture), largest first so the smaller ones reuse its pool memory. Returns
        how many graphs exist; stops at the first failure."""
        for size in reversed(self.sizes):
            if self.disabled:
                break
            if size not in self.graphs:
                self._capture(size)
        return len(self.graphs)

    def describe(self) -> str:
        if self.disabled:
            return f"off: {self.disabled}"
        captured = ", ".join(map(str, sorted(self.graphs))) or "none yet"
        return f"on (batch sizes up to {self.max_batch}; captured: {captured})"


def graphs_unavailable(backend, weights) -> str | None:
    """Why decode graphs cannot be used with this backend and weight store, or None."""
    if not backend.caps.graphs:
        return f"{backend.info.label} cannot capture device graphs"
    if not getattr(weights, "fully_resident", False):
        return "weights are staged from the checkpoint per step (offload)"
    return None
