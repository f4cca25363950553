"""Weight-only quantized kernels for the CPU backend, bound once per weight at load by
prepare_weight (`PackedWeight.native`, a GEMM closure); linear and the MLPs call it with no branch
on the scheme per call.

Where the native library builds (native.py), every closure reads the packed data and scales as
they are stored, so load copies nothing (one copy per weight; a tied embedding table and LM head
share it, the lookup reading rows of the same bytes):
  decode (<= QGEMV_MAX_ROWS rows)  qgemv.c: the integers decoded exactly in registers, fp32
                                   accumulation (bf16/fp32 activations; others take the prefill path);
                                   with int8 activations (OPS_INT8_ACTIVATIONS) qgemv_a8.c: integer
                                   multiply-adds on activations quantized per block of 32
  prefill                          gemm.c where AVX2 is the widest vector unit: tiles of rows
                                   dequantized in L1 to exactly the values the reference computes
                                   (q * s, cast as torch casts); elsewhere a chunk of rows dequantized
                                   by qgemv.c, then torch's GEMM (bf16 widened to fp32 where the CPU
                                   has no bf16 arithmetic)
Without it (no compiler, ERNIE_HAL_CPU_NATIVE=0), torch's own weight-pack GEMMs:
  wint8 per channel   aten._weight_int8pack_mm on the packed int8 layout as it is
  wint8 grouped       the same op once per group of input columns, the partial products summed
                      (torch's op has one scale per row)
  wint4               aten._weight_int4pack_mm_for_cpu on torch's int4pack layout, converted once
                      at load (_convert_weight_to_int4pack_for_cpu); its group must be 32..256, so
                      a per-channel or wider group repeats its scale over groups of 256
and those copies replace the packed integers except for the embedding table, whose lookup reads
rows (a tied wint4 table is then held in both layouts).
Measured against each other on the 0.3B shapes: benchmarks/bench_quant_cpu.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...kernels.reference import quantized as ref
from ...kernels.reference.dequant import unpack_int4
from ...kernels.reference.moe import grouped_experts, moe_route
from .prefill_gemm import bf16_gemm_is_native, native_gemm, native_gemm_wins

INT4_GROUPS = (256, 128, 64, 32)
QGEMV_MAX_ROWS = 8                 # qgemv.c's row limit: one pass
CHUNKED_QGEMV_ROWS = 32            # batches up to this run qgemv 8 rows a pass (longer: dequantize + GEMM)
PREFILL_CHUNK_BYTES = 16 << 20     # dequantized rows per GEMM in prefill: bounded scratch
NATIVE_DTYPES = (torch.bfloat16, torch.float32)


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


def _gemm_native(lib, data: torch.Tensor, scales: torch.Tensor, bits: int, int8_activations: bool = False,
                 own_gemm: bool | None = None):
    """The packed weight as stored: qgemv (or qgemv_a8) for decode rows; for prefill gemm.c
    (own_gemm; default: where it beats torch's GEMM), else dequantized chunks + torch's GEMM.
    int8_activations where qgemv_a8 takes the shape (whole blocks of 32 columns, 64 for wint4),
    else the exact qgemv."""
    data, scales = data.contiguous(), scales.contiguous()      # views of the loaded tensors
    N, G = scales.shape
    K = data.shape[1] * (2 if bits == 4 else 1)
    decode = lib.qgemv_a8 if int8_activations and lib.qgemv_a8_supported(bits, K, G) else lib.qgemv
    chunk = max(16, PREFILL_CHUNK_BYTES // (4 * K))
    widen = not bf16_gemm_is_native()
    if own_gemm is None:
        own_gemm = native_gemm_wins(lib)

    def dequantized(x_dtype, n0, n1, wide=False):
        """Rows [n0, n1) as the reference casts them to x_dtype; wide: those bf16 values in fp32."""
        if x_dtype not in NATIVE_DTYPES:   # fp16: the reference's values, cast as it casts
            return ref.dequantize(data[n0:n1], scales[n0:n1], bits).to(x_dtype)
        w = torch.empty(n1 - n0, K, dtype=torch.float32 if wide else x_dtype)
        mode = 2 if wide else int(x_dtype == torch.bfloat16)
        lib.qdequant(bits, data.data_ptr(), scales.data_ptr(), G, w.data_ptr(), mode, n0, n1, K,
                     torch.get_num_threads())
        return w

    def gemm(x):
        x2 = x.reshape(-1, K)
        T = x2.shape[0]
        y = torch.empty(T, N, dtype=x2.dtype)
        if T <= CHUNKED_QGEMV_ROWS and x2.dtype in NATIVE_DTYPES:
            # decode batches: qgemv 8 rows a pass over the packed bytes (never every weight
            # dequantized per step)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            for m0 in range(0, T, QGEMV_MAX_ROWS):
                if decode(bits, x2[m0:].data_ptr(), x2.dtype == torch.bfloat16, x2.stride(0), data.data_ptr(),
                             scales.data_ptr(), G, y[m0:].data_ptr(), N, min(QGEMV_MAX_ROWS, T - m0), N, K,
                             torch.get_num_threads()):
                    raise MemoryError("qgemv: no memory for its activation scratch")
            return y.view(*x.shape[:-1], N)
        if own_gemm and x2.dtype in NATIVE_DTYPES:
            # prefill: gemm.c dequantizes tile by tile in L1 (the reference's values: rounded to
            # bf16 for a bf16 model), no dequantized copy in memory
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            return native_gemm(lib, x2, data, N, kind=bits, scales=scales,
                               round_bf16=x2.dtype == torch.bfloat16).view(*x.shape[:-1], N)
        # prefill elsewhere: dequantized row chunks through torch's GEMM; without bf16 arithmetic the
        # reference's bf16-rounded weights widened to fp32 (prefill_gemm.py)
        wide = widen and x2.dtype == torch.bfloat16
        xs = x2.float() if wide else x2
        for n0 in range(0, N, chunk):
            y[:, n0:n0 + chunk] = F.linear(xs, dequantized(x2.dtype, n0, min(N, n0 + chunk), wide))
        return y.view(*x.shape[:-1], N)
    return gemm


def _torch_ops(data, scales, bits, dtype):
    fn = _gemm_int8(data, scales, dtype) if bits == 8 else _gemm_int4(data, scales, dtype)
    if fn is None:                 # no torch op for this shape: dequantize per call (the reference)
        w = {"data": data, "scales": scales}

        def fn(x):
            return F.linear(x, ref.dequantize(w["data"], w["scales"], bits).to(x.dtype))
    return fn


def _staged_torch(data, scales, bits, dtype):
    """Without the library, a GEMM over a staging buffer's packed weight (refilled between uses)
    reading data and scales at call time: the int8 per-channel op takes the stored layout as it is;
    other layouts are dequantized per call (converting to int4pack per load costs ~7x the read of
    the bytes it follows, measured on the 300B expert shape)."""
    if bits == 8 and scales.shape[-1] == 1:
        N, K = data.shape

        def gemm(x):
            return torch.ops.aten._weight_int8pack_mm(x.reshape(-1, K), data, scales[:, 0].to(dtype)).view(
                *x.shape[:-1], N)
        return gemm

    def gemm_dequantized(x):
        return F.linear(x, ref.dequantize(data, scales, bits).to(x.dtype))
    return gemm_dequantized


def _library():
    from .native import load
    return load()[0]


def prepare_weight(w, role: str | None = None, staged: bool = False, int8_activations: bool = False):
    """PackedWeight -> the same with `native` GEMM closure(s) (one per expert of a stack).
    Native: the closures read w.data/w.scales, nothing is copied. Torch's ops: the int4 nibbles
    (and grouped int8) are dropped for the copy they use, unless the table is also an embedding.
    staged=True (a view of a staging buffer, core/memory/offload.py): closures that read its data
    and scales in place at call time, which the native ones already do. int8_activations: decode
    through qgemv_a8 (the native library only; torch's ops stay exact)."""
    lib = _library()
    if lib is not None:
        make = lambda d, s: _gemm_native(lib, d, s, w.bits, int8_activations)  # noqa: E731
    elif staged:
        make = lambda d, s: _staged_torch(d, s, w.bits, w.dtype)  # noqa: E731
        return w.with_native(make(w.data, w.scales) if w.data.dim() == 2 else
                             [make(w.data[e], w.scales[e]) for e in range(w.data.shape[0])])
    else:
        make = lambda d, s: _torch_ops(d, s, w.bits, w.dtype)  # noqa: E731
    if w.data.dim() == 2:
        native = make(w.data, w.scales)
    else:
        native = [make(w.data[e], w.scales[e]) for e in range(w.data.shape[0])]
    out = w.with_native(native)
    copied = lib is None and (w.bits == 4 or w.scales.shape[-1] > 1)   # int4pack, or int8 split into groups
    if copied and role != "embed":
        out.data = w.data.new_empty(tuple(w.data.shape[:-2]) + (0, 0))   # stacks stay indexable
    return out


# swiglu_mlp / moe_experts run one GEMM over a fused [gate; up] (parts' `parent`), so the loader
# fuses them (core/runtime/executor.py _parts_readable)
prepare_weight.reads_fused_parts = True


def linear(x: torch.Tensor, w) -> torch.Tensor:
    return w.native(x)


def _fused_gate_up(w_gate, w_up):
    """The fused [gate; up] GEMM when the two are exactly the rows of one prepared weight (the
    loader's fusion: `PackedWeight.parent`), else None."""
    p = w_gate.parent
    if (w_gate.native is not None or p is None or w_up.parent is not p or w_gate.row0 != 0
            or w_up.row0 != w_gate.shape[-2] or p.shape[-2] != 2 * w_gate.shape[-2]):
        return None
    return p.native


def _silu_mul(x, gate, up, fused, rows: int):
    """silu(gate(x)) * up(x) in x.dtype, one GEMM over the fused rows where there is one. silu
    runs on a contiguous copy of the gate half: the vectorised path the unfused output takes, so
    the same values (each output row is one dot product either way)."""
    if fused is None:
        h = F.silu(gate(x), inplace=True)
        return h.mul_(up(x))
    gu = fused(x)
    h = F.silu(gu[..., :rows].contiguous(), inplace=True)
    return h.mul_(gu[..., rows:])


def swiglu_mlp(x: torch.Tensor, w_gate, w_up, w_down) -> torch.Tensor:
    h = _silu_mul(x, w_gate.native, w_up.native, _fused_gate_up(w_gate, w_up), w_gate.shape[-2])
    return w_down.native(h)


def moe_experts(x, topk_weights, topk_ids, w_gate, w_up, w_down) -> torch.Tensor:
    d, rows = w_down.native, w_gate.shape[-2]
    fused = _fused_gate_up(w_gate, w_up)
    g, u = (w_gate.native, w_up.native) if fused is None else ([None] * len(d), [None] * len(d))
    f = fused if fused is not None else [None] * len(d)

    def expert(e, xs):
        return d[e](_silu_mul(xs, g[e], u[e], f[e], rows))
    return grouped_experts(x, topk_weights, topk_ids, len(d), expert)


def moe(x, router_weight, correction_bias, w_gate, w_up, w_down, top_k: int, norm_min: float, shared=None):
    weights, ids = moe_route(x, router_weight, correction_bias, top_k, norm_min)
    out = moe_experts(x, weights, ids, w_gate, w_up, w_down)
    if shared is not None:
        out = out + swiglu_mlp(x, *shared)
    return out


NATIVE_EMBEDDING_ROWS = 64        # lookups of up to this many ids dequantize natively, row by row


def _make_embedding(lib):
    """The reference lookup's values (q * s in fp32, cast to w.dtype); with the native library a
    decode step's few ids are dequantized by qgemv.c straight from the packed table, not through
    torch's gather + unpack."""
    if lib is None:
        return ref.embedding

    def embedding(ids: torch.Tensor, w) -> torch.Tensor:
        if ids.numel() > NATIVE_EMBEDDING_ROWS or w.dtype not in NATIVE_DTYPES or w.data.dim() != 2:
            return ref.embedding(ids, w)
        data, scales = w.data, w.scales
        G = scales.shape[-1]
        K = data.shape[1] * (2 if w.bits == 4 else 1)
        out = torch.empty(ids.numel(), K, dtype=w.dtype)
        step = K * out.element_size()
        for r, i in enumerate(ids.tolist()):
            # rows [i, i + 1) of the table into row r of `out`
            lib.qdequant(w.bits, data.data_ptr(), scales.data_ptr(), G, out.data_ptr() + r * step,
                         int(w.dtype == torch.bfloat16), i, i + 1, K, 1)
        return out.view(*ids.shape, K)
    return embedding


embedding = _make_embedding(_library())   # bound once, when the quantized CPU table is first asked for
prepare_weight_int8_activations = functools.partial(prepare_weight, int8_activations=True)
prepare_weight_int8_activations.reads_fused_parts = True

OPS = {"linear": linear, "swiglu_mlp": swiglu_mlp, "moe_experts": moe_experts, "moe": moe,
       "prepare_weight": prepare_weight, "embedding": embedding}
# the same kernels, bound to decode on int8 activations (load(..., int8_activations=True))
OPS_INT8_ACTIVATIONS = {**OPS, "prepare_weight": prepare_weight_int8_activations}
