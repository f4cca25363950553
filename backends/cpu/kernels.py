"""The CPU backend's fast kernels: the native GEMV for decode-sized projections, the fused
gate/up SwiGLU, and routed experts grouped per active expert. Each has the reference op's
signature and is checked against kernels/reference in tests/unit/test_cpu_kernels.py.

Prefill-sized projections (more than GEMV_MAX_ROWS rows) go to gemm.c where AVX2 is the widest
vector unit, else to torch's F.linear (bf16 in fp32 where the CPU has no bf16 arithmetic:
prefill_gemm.py); so do dtypes or layouts the native kernels do not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels.reference.moe import grouped_experts, moe_route
from ...kernels.reference.norm import add_rms_norm as ref_add_rms_norm
from ...kernels.reference.norm import rms_norm as ref_rms_norm
from .attention_kernels import make_gqa_attention, make_rope_kv_write
from .prefill_gemm import bf16_gemm_is_native, linear_fp32, native_gemm, native_gemm_wins

GEMV_MAX_ROWS = 8     # up to this many rows the native GEMV beats torch's GEMM here (decode batches)
CHUNKED_GEMV_ROWS = 32  # without bf16 arithmetic, bf16 batches up to this run the GEMV 8 rows a pass
NORM_MAX_ROWS = 64    # the native norm is one thread; longer prefills take torch's threaded ops
# from these rows on gemm.c beats the GEMV in passes (bf16: x1.12 at 12 rows, x0.93 at 9) and torch's
# fp32 GEMM (x1.9-2.2 at 9-32 rows) over the 0.3B projections here; below, the GEMV reads each weight once
OWN_GEMM_MIN_ROWS = {torch.bfloat16: 12, torch.float32: GEMV_MAX_ROWS + 1}


def make_linear(native, widen_bf16: bool | None = None, own_gemm: bool | None = None):
    """linear(x [T, in], w [out, in]) -> [T, out] in x.dtype, the native GEMV for small T (8 rows
    a pass). Where gemm.c beats torch's GEMM (own_gemm; default: native_gemm_wins), batches from
    OWN_GEMM_MIN_ROWS take it. Elsewhere, widen_bf16 (default: where the CPU has no bf16
    arithmetic): bf16 batches up to CHUNKED_GEMV_ROWS take the GEMV in passes and longer ones an
    fp32 GEMM (prefill_gemm.py), since torch's bf16 GEMM is slow there."""
    entry = {torch.bfloat16: native.bf16, torch.float32: native.f32}
    if widen_bf16 is None:
        widen_bf16 = not bf16_gemm_is_native()
    max_rows = {torch.bfloat16: CHUNKED_GEMV_ROWS if widen_bf16 else GEMV_MAX_ROWS, torch.float32: GEMV_MAX_ROWS}
    if own_gemm is None:
        own_gemm = native_gemm_wins(native)

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        fn = entry.get(x.dtype)
        native_shape = (fn is not None and x.dim() == 2 and w.dtype == x.dtype and x.stride(1) == 1
                        and w.dim() == 2 and w.is_contiguous() and w.shape[1] == x.shape[1])
        if native_shape and own_gemm and x.shape[0] >= OWN_GEMM_MIN_ROWS[x.dtype]:
            return native_gemm(native, x, w, w.shape[0])
        if not native_shape or x.shape[0] > max_rows[x.dtype]:
            if widen_bf16 and x.dtype == w.dtype == torch.bfloat16 and w.dim() == 2:
                return linear_fp32(x, w)
            return F.linear(x, w)
        M, K = x.shape
        N = w.shape[0]
        y = torch.empty(M, N, dtype=x.dtype)
        threads = torch.get_num_threads()
        for m0 in range(0, M, GEMV_MAX_ROWS):
            fn(x[m0:].data_ptr(), x.stride(0), w.data_ptr(), y[m0:].data_ptr(), N, min(GEMV_MAX_ROWS, M - m0), N, K,
               threads)
        return y

    linear.ernie_hal_impl = f"cpu-native-gemv ({native.isa})" + (", gemm.c prefill" if own_gemm else "")
    return linear


def fused_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """[a; b] as one tensor without a copy when b's rows follow a's in memory (the fused
    gate/up buffer the loader makes), else None."""
    if (a.dim() != 2 or a.shape != b.shape or a.dtype != b.dtype or not a.is_contiguous()
            or not b.is_contiguous() or b.data_ptr() != a.data_ptr() + a.numel() * a.element_size()):
        return None
    return a.as_strided((2 * a.shape[0], a.shape[1]), (a.shape[1], 1))


def make_swiglu_mlp(linear):
    def swiglu_mlp(x, w_gate, w_up, w_down):
        """down(silu(gate(x)) * up(x)) in x.dtype: the reference's ops and roundings, with one
        projection over the fused [gate; up] rows when the loader laid them out that way."""
        both = fused_rows(w_gate, w_up)
        if both is None:
            h = F.silu(linear(x, w_gate), inplace=True)
            h.mul_(linear(x, w_up))
        else:
            I = w_gate.shape[0]
            gu = linear(x, both)
            # silu on a contiguous copy: the vectorised path the unfused output takes, so the
            # same values (a strided slice may take torch's scalar exp); the product is exact either way
            h = F.silu(gu[:, :I].contiguous(), inplace=True)
            h.mul_(gu[:, I:])
        return linear(h, w_down)

    swiglu_mlp.ernie_hal_impl = "cpu-fused-swiglu"
    return swiglu_mlp


def make_moe_experts(swiglu_mlp):
    def moe_experts(x, topk_weights, topk_ids, w_gate, w_up, w_down):
        """The reference's routed sum (experts in index order, x.dtype, index_add_), as one
        grouped projection per active expert over its gathered tokens: the loop runs over the
        experts some token picked, never over tokens."""
        return grouped_experts(x, topk_weights, topk_ids, w_gate.shape[0],
                               lambda e, xs: swiglu_mlp(xs, w_gate[e], w_up[e], w_down[e]))

    moe_experts.ernie_hal_impl = "cpu-grouped-experts"
    return moe_experts


def make_moe(moe_experts, swiglu_mlp):
    def moe(x, router_weight, correction_bias, w_gate, w_up, w_down, top_k, norm_min, shared=None):
        weights, ids = moe_route(x, router_weight, correction_bias, top_k, norm_min)
        out = moe_experts(x, weights, ids, w_gate, w_up, w_down)
        if shared is not None:
            out = out + swiglu_mlp(x, *shared)
        return out

    moe.ernie_hal_impl = "cpu-grouped-experts"
    return moe


def make_norms(native) -> dict:
    """rms_norm and add_rms_norm (norm.c) for decode rows: the reference's roundings in one call."""
    def _takes(x, weight):
        return (x.dim() == 2 and x.shape[0] <= NORM_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float32)
                and weight.dtype == x.dtype and x.is_contiguous() and weight.is_contiguous())

    def add_rms_norm(x, residual, weight, eps):
        if not (_takes(x, weight) and residual.dtype == x.dtype and residual.shape == x.shape
                and residual.is_contiguous()):
            return ref_add_rms_norm(x, residual, weight, eps)
        out, summed = torch.empty_like(x), torch.empty_like(x)
        native.add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), summed.data_ptr(),
                            x.shape[0], x.shape[1], eps, x.dtype == torch.bfloat16)
        return out, summed

    def rms_norm(x, weight, eps):
        if not _takes(x, weight):
            return ref_rms_norm(x, weight, eps)
        out = torch.empty_like(x)
        native.add_rms_norm(x.data_ptr(), None, weight.data_ptr(), out.data_ptr(), None, x.shape[0], x.shape[1],
                            eps, x.dtype == torch.bfloat16)
        return out

    add_rms_norm.ernie_hal_impl = rms_norm.ernie_hal_impl = "cpu-native-norm"
    return {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm}


def fast_ops(native) -> dict:
    """op -> kernel for the ops the CPU backend runs its own way; the rest stay the reference's."""
    linear = make_linear(native)
    swiglu = make_swiglu_mlp(linear)
    experts = make_moe_experts(swiglu)
    return {"linear": linear, "swiglu_mlp": swiglu, "moe_experts": experts, "moe": make_moe(experts, swiglu),
            **make_norms(native), **attention_ops(native)}


def attention_ops(native) -> dict:
    """rope + KV write and decode attention (attention.c): plain or quantized models alike."""
    return {"rope_kv_write": make_rope_kv_write(native), "gqa_attention": make_gqa_attention(native)}
