"""ParallelModel: the executor on one rank of a tensor-parallel group.

Rank 0 runs the engine and scheduler as in one process; its `forward` first broadcasts the step
description (core/parallel/step.py), then runs its share of the step. The other ranks `follow`:
receive each step, run the same forward on their own KV cache, and leave when rank 0 stops.
The collectives inside the forward come from the kernel table (`all_reduce`, and `gather`: the
head's logits go to rank 0 only, which alone samples; the other ranks' forward returns None).
"""

from __future__ import annotations

import itertools
import weakref

import torch

from ..model.checkpoint_reader import Checkpoint
from ..model.graph import build
from ..plugins.communicator import CollectiveError
from ..plugins.kernel_table import OpSpec
from ..plugins.registry import get_registry
from ..quant import checkpoint as qckpt
from ..runtime.executor import ErnieModel
from ..runtime.kvcache import KVCache
from . import step as steps
from .group import bind_device
from .budgets import RankBudgets, apply_budget, plan_rank
from .layout import layout, local_config
from .offloaded import RankOffloadedWeights
from .weights import ShardedWeights

_generations = itertools.count(1)


class ParallelModel(ErnieModel):
    def __init__(self, graph, backend, kernels, weights, dtype, group, lay):
        super().__init__(graph, backend, kernels, weights, dtype)
        self.group, self.layout = group, lay
        self._dropped = []        # rank 0: generations of KV caches garbage-collected since the last step
        self.gather = kernels.ops["gather"]

    @torch.inference_mode()
    def project(self, h, head):
        """Rank 0: float32 logits of hidden rows `h`, every rank's vocabulary columns unpadded;
        the other ranks send theirs and get None."""
        logits = self.gather(self.kernels.linear(h, head), dim=-1)
        self.weights.step_done()
        return None if logits is None else logits[:, :self.config.vocab_size].float()

    @torch.inference_mode()
    def forward(self, ids, meta, kv, logit_rows=None):
        g = self.group
        g.check()
        if self.backend.device.type != "cpu":
            bind_device(self.backend.device)    # the server steps from its own thread
        try:
            if g.rank == 0:
                gen = getattr(kv, "_tp_generation", None)
                if gen is None:            # a KV cache new to the group: the followers allocate its twin
                    gen = kv._tp_generation = next(_generations)
                    weakref.finalize(kv, self._dropped.append, gen)
                dropped, self._dropped[:] = list(self._dropped), []
                steps.send(g.control, steps.Step(ids, meta, logit_rows, gen, kv.num_blocks, kv.block_size, dropped))
            return super().forward(ids, meta, kv, logit_rows)
        except CollectiveError as e:
            raise g.error(e) from None
        except BaseException as e:    # Ctrl-C included
            # the other ranks are inside this step's collectives: the group cannot go on
            g.fail(f"rank {g.rank} failed during a step ({type(e).__name__}: {e}); the group is shut down")
            raise

    def follow(self) -> None:
        """Ranks > 0: run rank 0's steps until it stops the group."""
        g, caches = self.group, {}         # KV generation -> this rank's twin of rank 0's cache
        while True:
            try:
                s = steps.receive(g.control, self.backend.device)
            except CollectiveError as e:
                raise g.error(e) from None
            if s is None:
                return
            for gen in s.dropped:
                old = caches.pop(gen, None)
                if old is not None:
                    self.backend.release(old.nbytes)
            kv = caches.get(s.kv_generation)
            if kv is None:
                c = self.config
                kv = caches[s.kv_generation] = KVCache(c.num_hidden_layers, s.kv_blocks, s.block_size,
                                                       c.num_key_value_heads, c.head_dim, self.dtype,
                                                       self.backend.device, alloc=self.backend.alloc)
            self.forward(s.ids, s.meta, kv, s.logit_rows)


def build_rank(ckpt: Checkpoint, backend, dtype: torch.dtype, group, expert_parallel: bool,
               allow_fallback: bool = True, progress=None, rss_before: int | None = None,
               quant=None, budgets: RankBudgets | None = None) -> ParallelModel:
    """This rank's model: its layout, its slices read from `ckpt`, kernels plus collectives;
    `quant` (a QuantSpec, checked by the caller against the checkpoint) packs its weights;
    `budgets` (per rank) plan and stage its slices as one process stages a model (its plan in
    `model.plan`). Ends with every rank's host memory (RSS before loading, peak and RSS after)
    gathered in `model.rank_memory`."""
    config = ckpt.config
    stored = qckpt.stored_spec(config) is not None
    graph = build(config, untied_head=ckpt.lm_head_name == "lm_head.weight", quant=quant)
    ckpt.validate(qckpt.expected_tensors(graph) if stored else graph.expected_tensors())
    lay = layout(graph, group.world_size, group.rank, expert_parallel)
    local = local_config(graph, lay)
    kernels = get_registry().kernel_table(backend, OpSpec.for_model(local, dtype, allow_fallback, quant))
    comm = backend.communicator(group.rank, group.world_size)
    for op, fn in (("all_reduce", comm.all_reduce), ("gather", comm.gather)):
        kernels.ops[op] = fn
        kernels.sources[op] = f"torch.distributed ({backend.caps.collectives})"

    def reduce_max(t):               # load time, on the host: the CPU (gloo) group
        try:
            return group.control.all_reduce(t, op="max")
        except CollectiveError as e:
            raise group.error(e) from None

    prepare = getattr(kernels, "prepare_weight", None) if quant is not None else None
    plan = None
    if budgets is None:
        weights = ShardedWeights(graph, ckpt, backend, dtype, lay, progress=progress, prepare=prepare,
                                 stored_quant=stored, reduce_max=reduce_max)
        local_graph = type(graph)(config=local, embed=graph.embed, blocks=graph.blocks,
                                  final_norm=graph.final_norm, head=graph.head, quant=quant)
    else:
        local_graph, plan = plan_rank(graph, lay, backend, dtype, budgets, ckpt.path, stored)
        apply_budget(backend, plan, budgets)
        weights = RankOffloadedWeights(graph, local_graph, ckpt, backend, dtype, plan, lay, reduce_max=reduce_max,
                                       progress=progress, prefetch=budgets.prefetch,
                                       cache_policy=budgets.expert_cache, prepare=prepare, stored_quant=stored)
    model = ParallelModel(local_graph, backend, kernels, weights, dtype, group, lay)
    model.plan = plan
    before = _rss() if rss_before is None else rss_before
    mine = torch.tensor([before, _peak_rss(), _rss()], dtype=torch.int64)
    try:
        rows = group.control.all_gather(mine, dim=0).reshape(-1, 3).tolist()
    except CollectiveError as e:
        raise group.error(e) from None
    model.rank_memory = [dict(rank=r, rss_before_load_bytes=b, peak_rss_bytes=p, rss_after_load_bytes=a)
                         for r, (b, p, a) in enumerate(rows)]
    return model


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    from ..rss import peak_rss_bytes     # VmHWM: a worker exec'd from a large rank 0 starts afresh
    return peak_rss_bytes()
