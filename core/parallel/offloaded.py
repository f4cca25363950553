"""RankOffloadedWeights: one rank's slices under memory budgets, staged by the one-process engine.

The rank's graph (core/parallel/rank_graph.py) is planned by core/memory/placement.py under the
rank's budgets and staged by core/memory/offload.py's OffloadedWeights, whose reads go through
the rank's slices (core/parallel/rank_source.py). What a rank adds to that store:
- the embedding: ids owned by another rank contribute zero rows (the partial rows are then
  all-reduced), as ShardedWeights' extra zero row does;
- expert parallel: the router picks among all experts, the rank holds E / N of them, so every
  MoE layer goes through `routed_experts`, which runs the rank's experts (staged, cached or
  resident) for the tokens routed to them;
- weights quantized at load (host or device tier of a plain checkpoint) are cut as
  core/parallel/packed.py cuts them (per-channel row-parallel scales take the ranks' max).
"""

from __future__ import annotations

import torch

from ..memory.offload import OffloadedWeights
from ..quant.format import PackedWeight
from .layout import RankLayout
from .packed import ZERO_CODE, read_shard, rows
from .rank_source import RankCheckpoint, RankReader


class RankOffloadedWeights(OffloadedWeights):
    def __init__(self, graph, local_graph, ckpt, backend, dtype, plan, lay: RankLayout, reduce_max=None,
                 **kw):
        """graph: the whole model's; local_graph: rank_graph(graph, lay), what is planned and staged."""
        self.whole = {w.name: w for w in graph.weights()}
        self.lay, self.reduce_max = lay, reduce_max
        self._stacks: dict = {}           # EP: layer -> this step's stacked experts (resident or staged)
        source = RankCheckpoint(ckpt, lay, graph.quant)
        super().__init__(local_graph, source, backend, dtype, plan, reader=RankReader(source), **kw)

    def _quantize_at_load(self, r, dst) -> None:
        s = self.lay.shard(self.whole[r.name])
        real = s.stop - s.start if s.dim == 0 else dst.shape[0]
        if real < dst.shape[0]:               # vocabulary padding: q = 0, s = 0
            dst.data[real:].fill_(ZERO_CODE[r.quant.bits])
            dst.scales[real:].zero_()
            dst = rows(dst, real)
        read_shard(self.ckpt.ckpt, self.whole[r.name], s, False, self.reduce_max, dst)

    # ---- the store interface ---------------------------------------------------------------------
    def embedding(self, ids: torch.Tensor):
        v0, v1 = self.lay.vocab
        local = ids - v0
        mine = (local >= 0) & (local < v1 - v0)
        table, idx = super().embedding(torch.where(mine, local, torch.zeros_like(local)))
        # a table of the step's rows and one zero row, which the other ranks' ids look up
        T = ids.shape[0]
        if isinstance(table, PackedWeight):
            pick = lambda t: torch.cat([t.index_select(0, idx), t.new_zeros((1,) + tuple(t.shape[1:]))])  # noqa: E731
            step = PackedWeight(pick(table.data), pick(table.scales), table.spec, (T + 1,) + tuple(table.shape[1:]),
                                table.dtype)
        else:
            step = torch.cat([table.index_select(0, idx), table.new_zeros((1, table.shape[1]))])
        return step, torch.where(mine, torch.arange(T, device=ids.device), torch.full_like(ids, T))

    def layer(self, i: int):
        lw = super().layer(i)
        if self.lay.expert_parallel and lw.experts is not None:
            self._stacks[i], lw.experts = lw.experts, None      # route over all experts first
        return lw

    def routed_experts(self, i, h, weights, ids, moe_experts):
        if not self.lay.expert_parallel:
            return super().routed_experts(i, h, weights, ids, moe_experts)
        e0, e1 = self.lay.experts
        k = ids.shape[1]
        flat = ids.reshape(-1)
        mine = ((flat >= e0) & (flat < e1)).nonzero().reshape(-1)       # entries t*k + j
        out = torch.zeros_like(h)
        if mine.numel() == 0:
            self._stacks.pop(i, None)
            return out
        tok = mine // k
        args = (h.index_select(0, tok), weights.reshape(-1)[mine].reshape(-1, 1), (flat[mine] - e0).reshape(-1, 1))
        stack = self._stacks.pop(i, None)
        y = moe_experts(*args, *stack) if stack is not None else super().routed_experts(i, *args, moe_experts)
        return out.index_add_(0, tok, y)
