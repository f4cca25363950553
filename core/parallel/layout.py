"""The parallel layout: which slice of every weight each of N ranks holds.

Megatron's split, computed from the graph and N, nothing on a device:
- attention: q/k/v column-parallel by heads, o row-parallel (its partial sums all-reduced).
  With N > num_key_value_heads each KV head is replicated on N / num_key_value_heads ranks
  (vLLM's rule); when neither count divides the other there is no even split: refused.
- dense MLP and shared experts: gate/up column-parallel, down row-parallel (all-reduced).
- routed experts: tensor parallel shards each expert on its intermediate dim; expert parallel
  gives each rank E / N whole experts (it runs them for the tokens routed to them; one
  all-reduce sums the ranks' parts). Router weight and bias are replicated.
- embedding and LM head: vocabulary-parallel, the vocabulary padded up to a multiple of N;
  the embedding's partial rows are all-reduced, the head's logits gathered.
Norms are replicated.

Weight-only quantization (core/quant) splits the same way: scales are per row and groups run
along the input dimension, so a column-parallel shard (rows) is a slice of the packed integers
and the scales alike. A row-parallel shard (o, down: input columns split) keeps whole groups only
when the group size divides its width (`check` refuses otherwise, naming the tensor); per channel,
every rank's scale is the whole row's (core/parallel/packed.py). Bytes per rank count the packed
integers plus fp32 scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.graph import ModelGraph, WeightRef
from ..plugins.backend import format_bytes as _fmt
from ..quant.scheme import QuantSpec, is_quantized_role


class LayoutError(ValueError):
    """The model cannot be split over this many ranks."""


@dataclass(frozen=True)
class Shard:
    """Rank's part of one checkpoint tensor: `dim` [start, stop) (dim None: the whole tensor),
    held as a tensor of `shape` (rows past stop - start are zero padding)."""
    name: str
    dim: int | None
    start: int
    stop: int
    shape: tuple
    role: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class RankLayout:
    rank: int
    world_size: int
    expert_parallel: bool
    heads: tuple                 # [start, stop) of query heads
    kv_heads: tuple              # [start, stop) of KV heads (one replicated head when N > nkv)
    vocab: tuple                 # [start, stop) of real vocabulary rows; padded to vocab_per_rank
    vocab_per_rank: int
    vocab_size: int              # the model's, for trimming gathered logits
    experts: tuple               # [start, stop) of routed experts held (all of them under TP)
    shards: dict = field(default_factory=dict)   # checkpoint name -> Shard

    def shard(self, ref: WeightRef) -> Shard:
        return self.shards[ref.name]

    def nbytes(self, dtype: torch.dtype, quant: QuantSpec | None = None) -> int:
        """Bytes this rank holds at `dtype` (router fp32); with `quant`, its quantized weights
        (projections, experts, embedding, head) as packed integers plus fp32 scales."""
        item = torch.empty((), dtype=dtype).element_size()
        total = 0
        for s in self.shards.values():
            if s.role == "router":
                total += s.numel * 4
            elif quant is not None and is_quantized_role(s.role):
                total += quant.packed_nbytes(s.shape)
            else:
                total += s.numel * item
        return total


def _split(n: int, world: int, rank: int) -> tuple:
    per = n // world
    return (rank * per, (rank + 1) * per)


def check(graph: ModelGraph, world_size: int, expert_parallel: bool = False, quant: QuantSpec | None = None) -> None:
    """Raise LayoutError (one line naming the counts) unless the model splits over world_size
    (and, with `quant`, unless every row-parallel shard holds whole quantization groups)."""
    c, N = graph.config, world_size
    if N < 1:
        raise LayoutError(f"tensor_parallel_size must be >= 1, found {N}")
    if N == 1:
        return
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    if nh % N:
        raise LayoutError(f"num_attention_heads {nh} is not divisible by tensor_parallel_size {N}; "
                          f"choose a tensor parallel size that divides {nh}")
    if nkv % N and N % nkv:
        raise LayoutError(f"num_key_value_heads {nkv} and tensor_parallel_size {N}: neither divides the other; "
                          f"choose a tensor parallel size that divides {nkv} or a multiple of it")
    dense = [b for b in graph.blocks if b.mlp is not None]
    if dense and c.intermediate_size % N:
        raise LayoutError(f"intermediate_size {c.intermediate_size} is not divisible by tensor_parallel_size {N}")
    if c.is_moe:
        if c.moe_num_shared_experts and c.shared_intermediate_size % N:
            raise LayoutError(f"shared experts' width {c.shared_intermediate_size} is not divisible by "
                              f"tensor_parallel_size {N}")
        if expert_parallel and c.moe_num_experts % N:
            raise LayoutError(f"moe_num_experts {c.moe_num_experts} is not divisible by tensor_parallel_size {N}; "
                              f"expert parallel needs an equal number of experts per rank")
        if not expert_parallel and c.moe_intermediate_size % N:
            raise LayoutError(f"moe_intermediate_size {c.moe_intermediate_size} is not divisible by "
                              f"tensor_parallel_size {N}; try --expert-parallel")
    elif expert_parallel:
        raise LayoutError("--expert-parallel needs a MoE model; this one is dense")
    if quant is not None:
        _check_groups(layout(graph, N, 0, expert_parallel), quant)


def _check_groups(lay: "RankLayout", quant: QuantSpec) -> None:
    """Row-parallel shards (input columns split; equal on every rank) must cut between groups:
    a group across two ranks would need one scale from both halves."""
    for s in lay.shards.values():
        if s.dim != 1 or not is_quantized_role(s.role):
            continue
        local = s.shape[1]
        full = local * lay.world_size
        if quant.group_size != -1 and local % quant.group_size:
            hint = ", --expert-parallel" if s.role == "expert" else ""
            raise LayoutError(
                f"{s.name}: input dimension {full} split over tensor_parallel_size {lay.world_size} is {local} "
                f"columns per rank, not a multiple of group size {quant.group_size}; use a --group-size that "
                f"divides {local} (or -1, per channel){hint} or another --tp")
        if quant.bits == 4 and local % 2:
            raise LayoutError(f"{s.name}: input dimension {full} split over tensor_parallel_size {lay.world_size} "
                              f"is {local} columns per rank, odd: wint4 packs two per byte; use wint8 or another --tp")


def layout(graph: ModelGraph, world_size: int, rank: int, expert_parallel: bool = False) -> RankLayout:
    """What rank `rank` of `world_size` holds."""
    check(graph, world_size, expert_parallel)
    c, N, r = graph.config, world_size, rank
    d = c.head_dim
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    heads = _split(nh, N, r)
    if N > nkv:                    # each KV head on N / nkv consecutive ranks
        j = r // (N // nkv)
        kv = (j, j + 1)
    else:
        kv = _split(nkv, N, r)
    vper = -(-c.vocab_size // N)
    vocab = (min(r * vper, c.vocab_size), min((r + 1) * vper, c.vocab_size))
    E = c.moe_num_experts
    experts = _split(E, N, r) if (expert_parallel and N > 1) else (0, E)
    shards = {}

    def put(ref, dim=None, span=None, rows=None):
        if dim is None:
            shards[ref.name] = Shard(ref.name, None, 0, ref.shape[0], ref.shape, ref.role)
            return
        shape = list(ref.shape)
        shape[dim] = rows if rows is not None else span[1] - span[0]
        shards[ref.name] = Shard(ref.name, dim, span[0], span[1], tuple(shape), ref.role)

    put(graph.embed, 0, vocab, rows=vper)
    if not graph.tied:
        put(graph.head, 0, vocab, rows=vper)
    put(graph.final_norm)
    for b in graph.blocks:
        put(b.input_norm)
        put(b.post_norm)
        put(b.q, 0, (heads[0] * d, heads[1] * d))
        put(b.k, 0, (kv[0] * d, kv[1] * d))
        put(b.v, 0, (kv[0] * d, kv[1] * d))
        put(b.o, 1, (heads[0] * d, heads[1] * d))
        if b.mlp is not None:
            _mlp(put, b.mlp, N, r)
            continue
        m = b.moe
        put(m.router)
        put(m.bias)
        if m.shared is not None:
            _mlp(put, m.shared, N, r)
        for e in m.experts[experts[0]:experts[1]]:
            if expert_parallel or N == 1:
                for ref in e.refs():
                    put(ref)
            else:
                _mlp(put, e, N, r)
    return RankLayout(rank=r, world_size=N, expert_parallel=bool(expert_parallel and N > 1), heads=heads,
                      kv_heads=kv, vocab=vocab, vocab_per_rank=vper, vocab_size=c.vocab_size,
                      experts=experts, shards=shards)


def _mlp(put, mlp, N, r) -> None:
    width = mlp.gate.shape[0]
    span = _split(width, N, r)
    put(mlp.gate, 0, span)
    put(mlp.up, 0, span)
    put(mlp.down, 1, span)


def local_config(graph: ModelGraph, lay: RankLayout):
    """The config the rank's executor and KV cache run with: its own head counts."""
    return graph.config.replace(num_attention_heads=lay.heads[1] - lay.heads[0],
                                num_key_value_heads=lay.kv_heads[1] - lay.kv_heads[0])


def all_layouts(graph: ModelGraph, world_size: int, expert_parallel: bool = False) -> list:
    return [layout(graph, world_size, r, expert_parallel) for r in range(world_size)]


def describe(graph: ModelGraph, world_size: int, expert_parallel: bool, dtype: torch.dtype,
             quant: QuantSpec | None = None, plans: list | None = None) -> dict:
    """The layout as data for --json: per rank, what it holds and its bytes (packed under `quant`);
    with `plans` (placement Plans per rank, under per-rank budgets) each rank's bytes by tier."""
    lays = all_layouts(graph, world_size, expert_parallel)
    c = graph.config
    ranks = []
    for lay in lays:
        ranks.append(dict(rank=lay.rank, heads=list(lay.heads), kv_heads=list(lay.kv_heads),
                          vocab=list(lay.vocab), vocab_rows=lay.vocab_per_rank,
                          experts=list(lay.experts) if c.is_moe else None,
                          bytes=lay.nbytes(dtype, quant)))
        if plans is not None:
            p = plans[lay.rank]
            ranks[-1].update(plan=dict(device_bytes=p.tier_bytes("device"), host_bytes=p.tier_bytes("host"),
                                       disk_bytes=p.tier_bytes("disk"), device_budget_bytes=p.device_budget,
                                       host_budget_bytes=p.host_budget, mode=p.mode, unified_memory=p.unified))
    kv_replicas = max(1, world_size // c.num_key_value_heads)
    mode = ("expert parallel" if lays[0].expert_parallel else "tensor parallel") if c.is_moe else "tensor parallel"
    return dict(world_size=world_size, mode=mode, kv_head_replicas=kv_replicas,
                vocab_padded=lays[0].vocab_per_rank * world_size, vocab_size=c.vocab_size,
                dtype=str(dtype).replace("torch.", ""), quantization=quant.label if quant else "none",
                total_bytes=sum(r["bytes"] for r in ranks), ranks=ranks)


def table(desc: dict) -> str:
    """describe()'s answer as a printable table."""
    q = desc.get("quantization", "none")
    weights = desc["dtype"] if q == "none" else f"{q} (packed integers + fp32 scales), the rest {desc['dtype']}"
    lines = [f"parallel layout: {desc['world_size']} ranks, {desc['mode']}, weights {weights}; "
             f"vocabulary {desc['vocab_size']} padded to {desc['vocab_padded']}; "
             f"each KV head on {desc['kv_head_replicas']} rank(s)",
             f"{'rank':>4}  {'q heads':>9}  {'kv heads':>9}  {'vocab rows':>15}  {'experts':>9}  {'bytes':>10}"]
    for r in desc["ranks"]:
        ex = f"{r['experts'][0]}-{r['experts'][1] - 1}" if r["experts"] else "-"
        lines.append(f"{r['rank']:>4}  {r['heads'][0]:>4}-{r['heads'][1] - 1:<4}  {r['kv_heads'][0]:>4}-"
                     f"{r['kv_heads'][1] - 1:<4}  {r['vocab'][0]:>7}-{r['vocab'][1] - 1:<7}  {ex:>9}  "
                     f"{_fmt(r['bytes']):>10}")
    lines.append(f"total {_fmt(desc['total_bytes'])} over {desc['world_size']} ranks")
    for r in desc["ranks"]:
        p = r.get("plan")
        if p is None:
            continue
        budget = (f"memory budget {_fmt(p['device_budget_bytes'])} (unified)" if p["unified_memory"] else
                  f"device budget {_fmt(p['device_budget_bytes'])}, host budget {_fmt(p['host_budget_bytes'])}")
        lines.append(f"rank {r['rank']} offload plan ({p['mode']}, {budget}, per rank): device "
                     f"{_fmt(p['device_bytes'])}, pinned host {_fmt(p['host_bytes'])}, streamed {_fmt(p['disk_bytes'])}")
    return "\n".join(lines)
