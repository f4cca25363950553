"""ShardedWeights: one rank's slices of every weight, read straight from the checkpoint.

A weight store for the executor (same interface as ResidentWeights). Each tensor is read with
Checkpoint.read_slice, so a rank touches only its own rows or columns of the file and holds about
1/N of the model. Tensor parallel: the routed experts are stacked [E, I/N, H] and the `moe` op
runs as usual (its output is a partial sum). Expert parallel: LayerWeights.experts stays None so
the executor routes first and asks `routed_experts`, which runs this rank's experts for the
tokens routed to them; the shared experts (column/row split) are added by the executor.

Weight-only quantized models (graph.quant) hold PackedWeights cut the same way (core/parallel/
packed.py), each passed once through the kernel table's prepare_weight, as one process holds them.
The embedding's lookup table is not prepared: every backend's quantized `embedding` reads the
packed rows as they are (core/quant/format.py); a tied head is its first vocab_per_rank rows,
prepared as the head.
"""

from __future__ import annotations

import torch

from ..rss import release_free_heap
from ..runtime.executor import LayerWeights
from .layout import RankLayout
from .packed import alloc_packed, read_shard, rows


class ShardedWeights:
    fully_resident = False     # collectives and step broadcasts are not captured in decode graphs

    def __init__(self, graph, checkpoint, backend, dtype: torch.dtype, lay: RankLayout, progress=None,
                 prepare=None, stored_quant: bool = False, reduce_max=None):
        """Quantized graphs: `prepare` the kernel table's prepare_weight, `stored_quant` the
        checkpoint holds packed weights, `reduce_max(t)` the ranks' elementwise max of a host
        tensor, in place (packed.read_shard)."""
        self.graph, self.ckpt, self.backend, self.dtype, self.lay = graph, checkpoint, backend, dtype, lay
        self.progress = progress
        self.prepare = prepare or (lambda w, role=None: w)
        self.stored_quant, self.reduce_max = stored_quant, reduce_max
        self.local_experts = {}            # layer -> (gate, up, down) of this rank's experts (EP)
        vocab_rows = lay.vocab[1] - lay.vocab[0]
        # one extra zero row: ids owned by another rank look it up and contribute nothing
        table_shape = (lay.vocab_per_rank + 1, graph.config.hidden_size)
        if graph.embed.quant is not None:
            self.table = alloc_packed(graph.embed, table_shape, dtype, backend.alloc, padded=True)
            self._read_packed(graph.embed, rows(self.table, vocab_rows))
            head = rows(self.table, lay.vocab_per_rank)
            self.head = self.prepare(head, "head") if graph.tied else self._load_padded(graph.head)
        else:
            self.table = backend.alloc(table_shape, dtype).zero_()
            self._read_into(graph.embed, self.table[:vocab_rows])
            self.head = self.table[:lay.vocab_per_rank] if graph.tied else self._load_padded(graph.head)
        self.final_norm = self._load(graph.final_norm)
        self.layers = []
        for b in graph.blocks:
            self.layers.append(self._load_block(b))
            if graph.quant is not None:   # quantizing freed temporaries between kept weights (core/rss.py)
                release_free_heap()

    # ---- loading -----------------------------------------------------------------------------
    def _read_into(self, ref, out):
        s = self.lay.shard(ref)
        if s.dim is None:
            self.ckpt.read(ref.name, out=out, release=True)
        else:
            self.ckpt.read_slice(ref.name, out, s.dim, s.start, s.stop, release=True)
        if self.progress is not None:
            self.progress(out.numel() * out.element_size())
        return out

    def _read_packed(self, ref, out):
        read_shard(self.ckpt, ref, self.lay.shard(ref), self.stored_quant, self.reduce_max, out)
        if self.progress is not None:
            self.progress(out.nbytes)
        return out

    def _load(self, ref):
        shape = self.lay.shard(ref).shape
        if ref.quant is not None:
            out = alloc_packed(ref, shape, self.dtype, self.backend.alloc)
            return self.prepare(self._read_packed(ref, out), ref.role)
        target = torch.float32 if ref.role == "router" else self.dtype
        return self._read_into(ref, self.backend.alloc(shape, target))

    def _load_padded(self, ref):
        s = self.lay.shard(ref)
        if ref.quant is not None:
            out = alloc_packed(ref, s.shape, self.dtype, self.backend.alloc, padded=True)
            self._read_packed(ref, rows(out, s.stop - s.start))
            return self.prepare(out, ref.role)
        out = self.backend.alloc(s.shape, self.dtype).zero_()
        self._read_into(ref, out[:s.stop - s.start])
        return out

    def _stack(self, refs):
        shape = (len(refs),) + self.lay.shard(refs[0]).shape
        if refs[0].quant is not None:
            out = alloc_packed(refs[0], shape, self.dtype, self.backend.alloc)
            for i, ref in enumerate(refs):
                self._read_packed(ref, out[i])
            return self.prepare(out, refs[0].role)
        out = self.backend.alloc(shape, self.dtype)
        for i, ref in enumerate(refs):
            self._read_into(ref, out[i])
        return out

    def _load_block(self, b) -> LayerWeights:
        lw = LayerWeights(input_norm=self._load(b.input_norm), q=self._load(b.q), k=self._load(b.k),
                          v=self._load(b.v), o=self._load(b.o), post_norm=self._load(b.post_norm))
        if b.mlp is not None:
            lw.mlp = tuple(self._load(r) for r in b.mlp.refs())
            return lw
        m, (e0, e1) = b.moe, self.lay.experts
        lw.router = self._load(m.router)
        lw.bias = self._load(m.bias).reshape(-1)
        mine = m.experts[e0:e1]
        stacked = (self._stack([e.gate for e in mine]), self._stack([e.up for e in mine]),
                   self._stack([e.down for e in mine]))
        if self.lay.expert_parallel:
            self.local_experts[b.index] = stacked
        else:
            lw.experts = stacked
        if m.shared is not None:
            lw.shared = tuple(self._load(r) for r in m.shared.refs())
        return lw

    # ---- the weight-store interface ----------------------------------------------------------
    def embedding(self, ids):
        v0, v1 = self.lay.vocab
        rows = ids - v0
        mine = (rows >= 0) & (rows < v1 - v0)
        return self.table, torch.where(mine, rows, torch.full_like(rows, self.lay.vocab_per_rank))

    def layer(self, i: int) -> LayerWeights:
        return self.layers[i]

    def output(self):
        return self.final_norm, self.head

    def routed_experts(self, i, h, weights, ids, moe_experts):
        """Expert parallel: this rank's share of the routed sum (zero rows for tokens whose
        experts all live elsewhere)."""
        e0, e1 = self.lay.experts
        T, k = ids.shape
        flat = ids.reshape(-1)
        mine = ((flat >= e0) & (flat < e1)).nonzero().reshape(-1)       # entries t*k + j
        out = torch.zeros_like(h)
        if mine.numel() == 0:
            return out
        tok = mine // k
        y = moe_experts(h.index_select(0, tok), weights.reshape(-1)[mine].reshape(-1, 1),
                        (flat[mine] - e0).reshape(-1, 1), *self.local_experts[i])
        return out.index_add_(0, tok, y)

    def step_done(self) -> None:
        pass
