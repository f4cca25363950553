"""The executor: walks the ModelGraph calling the KernelTable bound at load.

Weights come from a weight store. `ResidentWeights` holds them all on the device;
core/memory/offload.py's `OffloadedWeights` stages them from the checkpoint under a memory budget.
A store answers, once per step and layer (plain method calls, never per token):
  embedding(ids) -> (table, ids into it)    the first call of a step
  layer(i)       -> LayerWeights            valid until layer(i + 1) / output()
  output()       -> (final_norm, head)
  routed_experts(i, h, weights, ids, moe_experts) -> routed sum; only asked when
                    LayerWeights.experts is None (the experts are not all on the device)
  step_done()                               the step's last call

Checkpoint quirks are handled at load time (routed experts stacked into [E, I, H] tensors,
tied head, fp32 router kept fp32), never in forward.

Fusion is a load step too: `ResidentWeights` reads q, k and v into one [q; k; v] buffer and
every gate/up pair (dense MLP, shared experts, each routed expert) into one [gate; up] buffer,
row-concatenated (core/runtime/fuse.py). Weight-only quantized models (graph.quant) hold
PackedWeights (core/quant) where tensors would be, quantized a block of rows at a time as they
are read (or read packed from a quantized checkpoint) straight into their rows of the fused
buffer, then passed once through the kernel table's prepare_weight into the layout the bound
kernels read. Packed [q; k; v] always fuses (the executor runs one linear over it); packed
[gate; up] fuses where the kernels can take parts of a fused weight (`_parts_readable`), else
each is its own weight. The executor runs one projection over `qkv` and splits the output;
gate and up stay views (row parts) of their buffer, so every swiglu/moe kernel keeps its
signature and a kernel that sees the two adjacent (backends/cpu) runs one projection for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plugins.backend import Backend
from ..quant.checkpoint import read_packed
from ..rss import release_free_heap
from ..quant.format import empty_packed
from ..model.graph import ModelGraph
from ..plugins.kernel_table import KernelTable
from .fuse import fused_rows, fused_stack


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    mlp: tuple | None = None          # (gate, up, down)
    router: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    experts: tuple | None = None      # stacked (gate [E,I,H], up [E,I,H], down [E,H,I])
    shared: tuple | None = None
    qkv: torch.Tensor | None = None   # [q; k; v] rows in one buffer (q, k, v are views / row parts of it)


class ResidentWeights:
    """Every weight resident on the backend's device, read from the checkpoint once."""

    fully_resident = True     # no host work per step: decode can be captured as a device graph

    def __init__(self, graph: ModelGraph, checkpoint, backend: Backend, dtype: torch.dtype, progress=None,
                 prepare=None, stored_quant: bool = False, fuse: bool = True):
        self.graph, self.ckpt, self.backend, self.dtype = graph, checkpoint, backend, dtype
        self.progress = progress
        self.prepare = prepare or (lambda w, role=None: w)   # kernel table's prepare_weight (quantized models)
        self.stored_quant = stored_quant          # the checkpoint holds packed weights already
        self.fuse = fuse                          # False: packed weights one by one (float ones always fuse)
        self.fuse_gate_up = None                  # packed: decided by the first prepared weight (_parts_readable)
        self.layers = []
        for b in graph.blocks:
            self.layers.append(self._load_block(b))
            self._trim()
        self.embed = self._load(graph.embed)
        self.final_norm = self._load(graph.final_norm)
        self.head = self.embed if graph.tied else self._load(graph.head)
        self._trim()

    def _trim(self):
        """Quantizing at load frees a block's temporaries between the weights it keeps: give
        those heap pages back so they do not pile up layer after layer (core/rss.py)."""
        if self.graph.quant is not None:
            release_free_heap()

    def _load(self, ref, dtype=None):
        if ref.quant is not None:
            pw = read_packed(self.ckpt, ref, self.dtype, self.stored_quant, alloc=self.backend.alloc)
            self._tick(ref.nbytes)
            return self.prepare(pw, ref.role)
        # the router and its bias stay fp32 (docs/model.md 4.2 item 7); everything else in the model dtype
        target = dtype or (torch.float32 if ref.role == "router" else self.dtype)
        out = self.backend.alloc(ref.shape, target)
        self.ckpt.read(ref.name, out=out, release=True)  # drop the file pages once copied
        self._tick(ref.nbytes)
        return out

    def _read(self, ref, out):
        self.ckpt.read(ref.name, out=out, release=True)
        self._tick(ref.nbytes)

    def _stack(self, refs):
        first = refs[0]
        if first.quant is not None:
            out = empty_packed(first.quant, (len(refs),) + first.shape, self.dtype, self.backend.alloc)
            for i, ref in enumerate(refs):
                read_packed(self.ckpt, ref, self.dtype, self.stored_quant, out=out, index=i)
                self._tick(ref.nbytes)
            return self.prepare(out, first.role)
        out = self.backend.alloc((len(refs),) + first.shape, self.dtype)
        for i, ref in enumerate(refs):
            self._read(ref, out[i])
        return out

    def _fused(self, refs) -> tuple:
        """(buffer, views): the refs' rows read one after another into one buffer."""
        return fused_rows([r.shape for r in refs], self.dtype, self.backend.alloc,
                          lambda i, out: self._read(refs[i], out))

    def _mlp(self, m) -> tuple:
        _, (gate, up) = self._fused([m.gate, m.up])
        return gate, up, self._load(m.down)

    def _load_block(self, b) -> LayerWeights:
        if self.graph.quant is not None:
            return self._load_block_packed(b)
        norm = self._load(b.input_norm)
        qkv, (q, k, v) = self._fused([b.q, b.k, b.v])
        lw = LayerWeights(input_norm=norm, q=q, k=k, v=v, o=self._load(b.o),
                          post_norm=self._load(b.post_norm), qkv=qkv)
        if b.mlp is not None:
            lw.mlp = self._mlp(b.mlp)
        else:
            m = b.moe
            lw.router = self._load(m.router)
            lw.bias = self._load(m.bias).reshape(-1)
            _, (gate, up) = fused_stack(len(m.experts), [m.experts[0].gate.shape, m.experts[0].up.shape],
                                        self.dtype, self.backend.alloc,
                                        lambda e, j, out: self._read((m.experts[e].gate, m.experts[e].up)[j], out))
            lw.experts = (gate, up, self._stack([e.down for e in m.experts]))
            if m.shared is not None:
                lw.shared = self._mlp(m.shared)
        return lw

    def _load_block_packed(self, b) -> LayerWeights:
        """Packed weights: [q; k; v] fused always (one linear over more rows); [gate; up] fused
        where the bound kernels can read a part of a fused weight (`_parts_readable`)."""
        if self.fuse:
            qkv, (q, k, v) = self._fused_packed([b.q, b.k, b.v])
            if self.fuse_gate_up is None:
                self.fuse_gate_up = self._parts_readable(qkv)
        else:
            qkv, (q, k, v) = None, (self._load(b.q), self._load(b.k), self._load(b.v))
        lw = LayerWeights(input_norm=self._load(b.input_norm), q=q, k=k, v=v, o=self._load(b.o),
                          post_norm=self._load(b.post_norm), qkv=qkv)
        if b.mlp is not None:
            lw.mlp = self._mlp_packed(b.mlp)
        else:
            m = b.moe
            lw.router = self._load(m.router)
            lw.bias = self._load(m.bias).reshape(-1)
            down = self._stack([e.down for e in m.experts])
            if self.fuse_gate_up:
                _, (gate, up) = self._fused_packed([[e.gate for e in m.experts], [e.up for e in m.experts]])
            else:
                gate, up = self._stack([e.gate for e in m.experts]), self._stack([e.up for e in m.experts])
            lw.experts = (gate, up, down)
            if m.shared is not None:
                lw.shared = self._mlp_packed(m.shared)
        return lw

    def _mlp_packed(self, m) -> tuple:
        if self.fuse_gate_up:
            _, (gate, up) = self._fused_packed([m.gate, m.up])
            return gate, up, self._load(m.down)
        return tuple(self._load(r) for r in m.refs())

    def _fused_packed(self, parts) -> tuple:
        """(fused PackedWeight, its row parts): each part (a ref, or a list of refs: the experts
        of a stack) quantized or read straight into its rows of one buffer, never held in float,
        then one prepare_weight call for the whole. Groups run along the input dimension and
        scales are per row, so the rows are exactly the parts' own quantization."""
        stacks = [p if isinstance(p, list) else [p] for p in parts]
        first = stacks[0][0]
        rows = [s[0].shape[0] for s in stacks]
        lead = (len(stacks[0]),) if isinstance(parts[0], list) else ()
        fused = empty_packed(first.quant, lead + (sum(rows), first.shape[-1]), self.dtype, self.backend.alloc)
        for refs, view in zip(stacks, fused.split_rows(rows)):
            for i, ref in enumerate(refs):
                read_packed(self.ckpt, ref, self.dtype, self.stored_quant, out=view, index=i if lead else None)
                self._tick(ref.nbytes)
        prepared = self.prepare(fused, first.role)
        return prepared, prepared.split_rows(rows)

    def _parts_readable(self, prepared) -> bool:
        """Can the bound kernels take parts of a fused packed weight (swiglu_mlp / moe given the
        [gate; up] parts)? Yes where they read data/scales (prepare_weight left `native` None: the
        parts are plain row views), or where prepare_weight says its kernels use `PackedWeight.parent`
        (`reads_fused_parts`, data on the kernel). Otherwise each part would need its own `native`."""
        return prepared.native is None or bool(getattr(self.prepare, "reads_fused_parts", False))

    def _tick(self, nbytes):
        if self.progress is not None:
            self.progress(nbytes)

    # ---- the weight-store interface ----------------------------------------------------------
    def embedding(self, ids):
        return self.embed, ids

    def layer(self, i: int) -> LayerWeights:
        return self.layers[i]

    def output(self):
        return self.final_norm, self.head

    def step_done(self) -> None:
        pass


class ErnieModel:
    def __init__(self, graph: ModelGraph, backend: Backend, kernels: KernelTable,
                 weights, dtype: torch.dtype):
        self.graph, self.config = graph, graph.config
        self.backend, self.kernels, self.weights, self.dtype = backend, kernels, weights, dtype
        c = self.config
        self.scale = c.head_dim ** -0.5
        # tensor-parallel ranks only (core/parallel binds it and gathers the logits); a single
        # process has no collectives
        self.all_reduce = getattr(kernels, "ops", {}).get("all_reduce")

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, meta, kv, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """ids [T] (ragged batch concatenated); meta: kvcache.AttentionMetadata for this step;
        kv: KVCache. Returns float32 logits for `logit_rows` (all rows when None)."""
        h, head = self.hidden_states(ids, meta, kv)
        if logit_rows is not None:
            h = h.index_select(0, logit_rows)
        return self.project(h, head)

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, meta, kv) -> tuple:
        """The final-normed hidden states [T, H] and the head weight, without the head GEMM:
        decode graphs capture this part (a small output) and project only the rows they need."""
        k, c, W = self.kernels, self.config, self.weights
        T = ids.shape[0]
        nh, nkv, d, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        table, rows = W.embedding(ids)
        x = self._reduce(k.embedding(rows, table))
        residual = None
        for i in range(c.num_hidden_layers):
            lw = W.layer(i)
            if residual is None:
                h, residual = k.rms_norm(x, lw.input_norm, eps), x
            else:
                h, residual = k.add_rms_norm(x, residual, lw.input_norm, eps)
            if lw.qkv is not None:   # one projection; q, k, v are column slices of its output
                q, kk, v = k.linear(h, lw.qkv).split((nh * d, nkv * d, nkv * d), dim=-1)
                q, kk, v = q.view(T, nh, d), kk.view(T, nkv, d), v.view(T, nkv, d)
            else:
                q = k.linear(h, lw.q).view(T, nh, d)
                kk = k.linear(h, lw.k).view(T, nkv, d)
                v = k.linear(h, lw.v).view(T, nkv, d)
            q = k.rope_kv_write(q, kk, v, meta.positions, c.rope_theta, kv.k[i], kv.v[i], meta.slot_mapping)
            attn = k.gqa_attention(q, kv.k[i], kv.v[i], meta.block_tables, meta.context_lens,
                                   meta.query_start_loc, self.scale)
            x = self._reduce(k.linear(attn.reshape(T, nh * d), lw.o))
            h, residual = k.add_rms_norm(x, residual, lw.post_norm, eps)
            if lw.mlp is not None:
                x = k.swiglu_mlp(h, *lw.mlp)
            elif lw.experts is not None:
                x = k.moe(h, lw.router, lw.bias, *lw.experts, c.moe_k, c.moe_norm_min, shared=lw.shared)
            else:
                x = self._staged_moe(i, h, lw)
            x = self._reduce(x)
        final_norm, head = W.output()
        h, _ = k.add_rms_norm(x, residual, final_norm, eps)
        return h, head

    @torch.inference_mode()
    def project(self, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden rows `h`; ends the step for the weight store."""
        logits = self.kernels.linear(h, head).float()
        self.weights.step_done()
        return logits

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.all_reduce is None else self.all_reduce(x)

    def _staged_moe(self, i: int, h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        """Route first; the store brings only the picked experts to the device. Same ops and
        order as the `moe` op: routed sum, then the shared experts added with weight 1."""
        k, c = self.kernels, self.config
        weights, ids = k.moe_route(h, lw.router, lw.bias, c.moe_k, c.moe_norm_min)
        out = self.weights.routed_experts(i, h, weights, ids, k.moe_experts)
        return out if lw.shared is None else out + k.swiglu_mlp(h, *lw.shared)
