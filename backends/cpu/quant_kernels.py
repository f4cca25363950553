"""Weight-only quantized kernels for the CPU backend: torch's own int8 / int4 weight-pack GEMMs.

Measured on the 0.3B shapes (benchmarks/bench_quant_cpu.py) against dequantize + matmul, they win
at GEMV (batch 1) and at prefill-size GEMMs, and read 2x / 4x fewer bytes than bf16 at GEMV:
  wint8 per channel   aten._weight_int8pack_mm on the packed int8 layout as it is
  wint8 grouped       the same op once per group of input columns, the partial products summed
                      (torch's op has one scale per row)
  wint4               aten._weight_int4pack_mm_for_cpu on torch's int4pack layout, converted once
                      at load by prepare_weight (_convert_weight_to_int4pack_for_cpu); its group
                      must be 32..256, so a per-channel or wider group repeats its scale over
                      groups of 256 (the same values)
prepare_weight binds each weight's GEMM as a closure (`PackedWeight.native`) once at load; linear
and the MLPs call it with no branch per call. The int4pack (or per-group int8) copy replaces the packed
integers except for the embedding table, whose lookup reads rows (a tied wint4 table is held in both layouts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels.reference import quantized as ref
from ...kernels.reference.dequant import unpack_int4
from ...kernels.reference.moe import grouped_experts, moe_route

INT4_GROUPS = (256, 128, 64, 32)


def _gemm_int8(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
    N, K = data.shape
    G = scales.shape[-1]
    if G == 1:
        s = scales[:, 0].to(dtype).contiguous()

        def gemm(x):
            return torch.ops.aten._weight_int8pack_mm(x.reshape(-1, K), data, s).view(*x.shape[:-1], N)
        return gemm
    gs = K // G
    parts = [(data[:, g * gs:(g + 1) * gs].contiguous(), scales[:, g].to(dtype).contiguous()) for g in range(G)]

    def gemm_grouped(x):
        x2 = x.reshape(-1, K)
        out = torch.ops.aten._weight_int8pack_mm(x2[:, :gs].contiguous(), *parts[0])
        for g in range(1, G):
            out.add_(torch.ops.aten._weight_int8pack_mm(x2[:, g * gs:(g + 1) * gs].contiguous(), *parts[g]))
        return out.view(*x.shape[:-1], N)
    return gemm_grouped


def _gemm_int4(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
    N = data.shape[0]
    K = data.shape[1] * 2
    G = scales.shape[-1]
    gs = K // G
    if N % 16:                     # int4pack tiles rows by 16
        return None
    if gs not in INT4_GROUPS:      # per channel or a group wider than 256: repeat the scale
        gs = next((g for g in INT4_GROUPS if gs % g == 0), None)
        if gs is None:
            return None
        scales = scales.repeat_interleave(K // G // gs, dim=-1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(data).to(torch.int32) + 8, 1)
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).to(dtype).contiguous()  # [G, N, 2]

    def gemm(x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, K), packed, gs, sz).view(*x.shape[:-1], N)
    return gemm


def _native(data, scales, bits, dtype):
    fn = _gemm_int8(data, scales, dtype) if bits == 8 else _gemm_int4(data, scales, dtype)
    if fn is None:                 # no torch op for this shape: dequantize per call (the reference)
        w = {"data": data, "scales": scales}

        def fn(x):
            return F.linear(x, ref.dequantize(w["data"], w["scales"], bits).to(x.dtype))
    return fn


def prepare_weight(w, role: str | None = None):
    """PackedWeight -> the same with `native` GEMM closure(s); the int4 nibbles are dropped
    (int4pack holds the values) unless the table is also an embedding."""
    if w.data.dim() == 2:
        native = _native(w.data, w.scales, w.bits, w.dtype)
    else:
        native = [_native(w.data[e], w.scales[e], w.bits, w.dtype) for e in range(w.data.shape[0])]
    out = w.with_native(native)
    copied = w.bits == 4 or w.scales.shape[-1] > 1      # int4pack, or int8 split into groups
    if copied and role != "embed":
        out.data = w.data.new_empty(tuple(w.data.shape[:-2]) + (0, 0))   # stacks stay indexable
    return out


def linear(x: torch.Tensor, w) -> torch.Tensor:
    return w.native(x)


def swiglu_mlp(x: torch.Tensor, w_gate, w_up, w_down) -> torch.Tensor:
    h = F.silu(w_gate.native(x), inplace=True)
    h.mul_(w_up.native(x))
    return w_down.native(h)


def moe_experts(x, topk_weights, topk_ids, w_gate, w_up, w_down) -> torch.Tensor:
    g, u, d = w_gate.native, w_up.native, w_down.native

    def expert(e, xs):
        h = F.silu(g[e](xs), inplace=True)
        h.mul_(u[e](xs))
        return d[e](h)
    return grouped_experts(x, topk_weights, topk_ids, len(g), expert)


def moe(x, router_weight, correction_bias, w_gate, w_up, w_down, top_k: int, norm_min: float, shared=None):
    weights, ids = moe_route(x, router_weight, correction_bias, top_k, norm_min)
    out = moe_experts(x, weights, ids, w_gate, w_up, w_down)
    if shared is not None:
        out = out + swiglu_mlp(x, *shared)
    return out


OPS = {"linear": linear, "swiglu_mlp": swiglu_mlp, "moe_experts": moe_experts, "moe": moe,
       "prepare_weight": prepare_weight, "embedding": ref.embedding}
