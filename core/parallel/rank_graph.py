"""One rank's view of the model graph: every WeightRef with the shape of the rank's shard (the
vocabulary-parallel embedding and head at vocab_per_rank rows, padding included), and under
expert parallel only the rank's routed experts, numbered from 0 in its own list. Names stay the
checkpoint's, so the placement planner and the staging engine (core/memory) plan and stage a
rank's slices as they do a whole model; core/parallel/rank_source.py reads them."""

from __future__ import annotations

from dataclasses import replace

from ..model.graph import MLPWeights, ModelGraph
from .layout import RankLayout, local_config


def rank_graph(graph: ModelGraph, lay: RankLayout) -> ModelGraph:
    e0, e1 = lay.experts

    def local(ref, expert=None):
        ref = replace(ref, shape=lay.shard(ref).shape)
        return ref if expert is None else replace(ref, expert=expert)

    def mlp(m, expert=None):
        return MLPWeights(*(local(r, expert) for r in m.refs()))

    blocks = []
    for b in graph.blocks:
        moe = b.moe
        if moe is not None:
            experts = tuple(mlp(m, (j if lay.expert_parallel else m.gate.expert))
                            for j, m in enumerate(moe.experts[e0:e1]))
            moe = replace(moe, router=local(moe.router), bias=local(moe.bias), experts=experts,
                          shared=mlp(moe.shared) if moe.shared is not None else None)
        blocks.append(replace(b, input_norm=local(b.input_norm), q=local(b.q), k=local(b.k), v=local(b.v),
                              o=local(b.o), post_norm=local(b.post_norm),
                              mlp=mlp(b.mlp) if b.mlp is not None else None, moe=moe))
    embed = local(graph.embed)
    head = embed if graph.tied else local(graph.head)
    return ModelGraph(config=local_config(graph, lay), embed=embed, blocks=tuple(blocks),
                      final_norm=local(graph.final_norm), head=head, quant=graph.quant)
