"""The device-neutral ERNIE-4.5 model graph: what the network is, with every weight named
as in the -PT checkpoint, with shape, dtype and bytes. Nothing here lives on a device.

Placement plans from it, the loader fills it, the executor (core/runtime/executor.py) walks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ..quant.scheme import QuantSpec, is_quantized_role
from .config import ModelConfig


@dataclass(frozen=True)
class WeightRef:
    name: str                 # checkpoint tensor name
    shape: tuple
    dtype: torch.dtype        # dtype in the checkpoint
    role: str                 # embed, norm, attn, mlp, router, expert, shared_expert, head
    layer: int | None = None
    expert: int | None = None
    quant: QuantSpec | None = None   # packed weight-only (core/quant) in memory; None: a plain tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def source_nbytes(self) -> int:
        """Bytes of the tensor as the (unquantized) checkpoint stores it."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes in its storage format: packed integers plus fp32 scales when quantized."""
        return self.quant.packed_nbytes(self.shape) if self.quant else self.source_nbytes

    def stored_nbytes(self, dtype: torch.dtype) -> int:
        """Bytes held in memory when plain tensors are kept in `dtype` (routers stay fp32)."""
        if self.quant:
            return self.quant.packed_nbytes(self.shape)
        return self.numel * (4 if self.role == "router" else dtype.itemsize)

    @property
    def storage(self) -> str:
        return self.quant.scheme if self.quant else str(self.dtype).replace("torch.", "")


@dataclass(frozen=True)
class MLPWeights:
    gate: WeightRef
    up: WeightRef
    down: WeightRef

    def refs(self):
        return (self.gate, self.up, self.down)


@dataclass(frozen=True)
class MoEWeights:
    router: WeightRef              # fp32 [E, H]
    bias: WeightRef                # fp32 [1, E], selection only
    experts: tuple                 # MLPWeights per expert, index order
    shared: MLPWeights | None      # S shared experts fused into one MLP of width S * I
    top_k: int
    norm_min: float

    def refs(self):
        yield self.router
        yield self.bias
        for e in self.experts:
            yield from e.refs()
        if self.shared:
            yield from self.shared.refs()


@dataclass(frozen=True)
class Block:
    index: int
    input_norm: WeightRef
    q: WeightRef
    k: WeightRef
    v: WeightRef
    o: WeightRef
    post_norm: WeightRef
    mlp: MLPWeights | None         # dense layers
    moe: MoEWeights | None         # MoE layers

    def refs(self):
        yield from (self.input_norm, self.q, self.k, self.v, self.o, self.post_norm)
        yield from (self.mlp.refs() if self.mlp else self.moe.refs())


@dataclass(frozen=True)
class ModelGraph:
    config: ModelConfig
    embed: WeightRef
    blocks: tuple
    final_norm: WeightRef
    head: WeightRef                # the embedding itself when tied
    quant: QuantSpec | None = None # weight-only scheme of the 2-D projections and the embedding

    @property
    def tied(self) -> bool:
        return self.head is self.embed

    def weights(self) -> Iterator[WeightRef]:
        """Every checkpoint tensor once (a tied head is not repeated)."""
        yield self.embed
        for b in self.blocks:
            yield from b.refs()
        yield self.final_norm
        if not self.tied:
            yield self.head

    @property
    def total_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights())

    def expected_tensors(self) -> dict:
        return {w.name: (w.shape, w.dtype) for w in self.weights()}


def build(config: ModelConfig, untied_head: bool | None = None,
          dtype: torch.dtype | None = None, quant: QuantSpec | None = None) -> ModelGraph:
    """The graph of `config`. `untied_head`: the checkpoint has lm_head.weight and the config
    says untied (docs/model.md lm_head rule); None means trust tie_word_embeddings. `quant`:
    every 2-D projection and the embedding are packed (QuantError when a shape cannot be)."""
    c = config
    dt = dtype or getattr(torch, c.dtype)
    H, d = c.hidden_size, c.head_dim

    def w(name, shape, role, layer=None, expert=None, wdtype=None):
        q = quant if quant is not None and is_quantized_role(role) else None
        if q is not None:
            q.check(name, tuple(shape))
        return WeightRef(name, tuple(shape), wdtype or dt, role, layer, expert, q)

    def mlp(prefix, width, role, layer, expert=None):
        return MLPWeights(gate=w(f"{prefix}.gate_proj.weight", (width, H), role, layer, expert),
                          up=w(f"{prefix}.up_proj.weight", (width, H), role, layer, expert),
                          down=w(f"{prefix}.down_proj.weight", (H, width), role, layer, expert))

    blocks = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        dense = moe = None
        if c.is_moe_layer(i):
            E = c.moe_num_experts
            moe = MoEWeights(
                router=w(f"{p}.mlp.gate.weight", (E, H), "router", i, wdtype=torch.float32),
                bias=w(f"{p}.mlp.moe_statics.e_score_correction_bias", (1, E), "router", i,
                       wdtype=torch.float32),
                experts=tuple(mlp(f"{p}.mlp.experts.{e}", c.moe_intermediate_size, "expert", i, e)
                              for e in range(E)),
                shared=(mlp(f"{p}.mlp.shared_experts", c.shared_intermediate_size, "shared_expert", i)
                        if c.moe_num_shared_experts else None),
                top_k=c.moe_k, norm_min=c.moe_norm_min)
        else:
            dense = mlp(f"{p}.mlp", c.intermediate_size, "mlp", i)
        blocks.append(Block(
            index=i,
            input_norm=w(f"{p}.input_layernorm.weight", (H,), "norm", i),
            q=w(f"{p}.self_attn.q_proj.weight", (c.num_attention_heads * d, H), "attn", i),
            k=w(f"{p}.self_attn.k_proj.weight", (c.num_key_value_heads * d, H), "attn", i),
            v=w(f"{p}.self_attn.v_proj.weight", (c.num_key_value_heads * d, H), "attn", i),
            o=w(f"{p}.self_attn.o_proj.weight", (H, c.num_attention_heads * d), "attn", i),
            post_norm=w(f"{p}.post_attention_layernorm.weight", (H,), "norm", i),
            mlp=dense, moe=moe))
    embed = w("model.embed_tokens.weight", (c.vocab_size, H), "embed")
    untied = (not c.tie_word_embeddings) if untied_head is None else untied_head
    head = w("lm_head.weight", (c.vocab_size, H), "head") if untied else embed
    return ModelGraph(config=c, embed=embed, blocks=tuple(blocks),
                      final_norm=w("model.norm.weight", (H,), "norm"), head=head, quant=quant)
