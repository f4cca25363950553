"""Fused MoE on packed expert weights (w8a16 / w4a16), with the reference signatures of
kernels/reference/quantized.py:

    make_moe_experts_wint(config) -> moe_experts(x, topk_weights, topk_ids, w_gate, w_up, w_down)
    make_moe_wint(config)         -> moe(x, router_weight, correction_bias, w_gate, w_up, w_down,
                                         top_k, norm_min, shared=None)

w_gate/w_up/w_down are PackedWeight stacks (core/quant/format.py: .data, .scales, .bits, .shape
[E, I, H] / [E, H, I]); shared is None or (g, u, d) PackedWeights of one SwiGLU MLP. Everything
but the two expert GEMMs is the float fused MoE's (moe.py): the router kernel, the align step,
the chunking over long prefills, the combine kernel that adds the shared experts' output. The
shared MLP runs on the packed linear + SwiGLU kernels (swiglu_wint.py). Nothing waits for the
device (graph-capturable).

Config: moe.py's (a flat tile dict or buckets keyed by the largest T each serves), plus an
optional "shared" key: the packed swiglu_mlp's config (swiglu_wint.py) for the shared experts.
BLOCK_K is lowered to the group size where it is larger (group sizes are powers of two from 32,
so one K tile then lies in one group and takes one scale per output row).
"""

import torch
import triton

from ._interpret import launch_options
from .moe import _launch_experts, _launch_route, gemm_flags, normalize_config
from .moe_wint_kernels import moe_down_wint_kernel, moe_gate_up_wint_kernel
from .swiglu_wint import make_swiglu_mlp_wint


def group_of(w) -> int:
    """Input columns per scale: the group size, or the whole row when per channel."""
    K = w.shape[-1]
    return K // w.scales.shape[-1]


def block_k_for(block_k: int, group: int, K: int) -> int:
    """The tile's K extent: within one group unless the weight is per channel (group == K)."""
    if group == K or group % block_k == 0:
        return block_k
    if group & (group - 1) or group < 16:
        raise ValueError(f"moe (weight-only): group size {group} is not a power of two >= 16")
    return min(block_k, group)


def gate_up_shared_memory(cfg: dict, itemsize: int = 2) -> int:
    """Shared memory (LDS on AMD) one packed gate+up program may hold: num_stages buffers of the
    A tile and its two packed B tiles (one byte per value: wint4 reads each byte for both of its
    columns), plus the two dequantized B tiles in the activation dtype where the compiler stages
    the dot operand through shared memory. The down kernel holds less."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    return cfg["num_stages"] * (bm * bk * itemsize + 2 * bk * bn) + 2 * bk * bn * itemsize


def _strides(w) -> tuple:
    return (*w.data.stride(), *w.scales.stride())


def _packed_gemms(cfg, x, k, w_flat, sorted_ids, expert_ids, num_post, w_gate, w_up, w_down, h, y):
    """gate+up (SwiGLU fused) into h, down (routing weight applied) into y, packed weights."""
    T, H = x.shape
    I = w_gate.shape[1]
    assert w_gate.bits == w_up.bits == w_down.bits, "moe (weight-only): one scheme for every expert weight"
    opts = launch_options(cfg)
    BN = cfg["BLOCK_N"]
    num_pid_m = expert_ids.numel()
    n = T * k
    g_gu, g_d = group_of(w_gate), group_of(w_down)
    assert group_of(w_up) == g_gu, "moe (weight-only): gate and up need one group size"

    flags = gemm_flags({**cfg, "BLOCK_K": block_k_for(cfg["BLOCK_K"], g_gu, H)}, x.dtype)
    moe_gate_up_wint_kernel[(num_pid_m * triton.cdiv(I, BN),)](
        x, w_gate.data, w_gate.scales, w_up.data, w_up.scales, h, sorted_ids, expert_ids, num_post,
        I, H, n, num_pid_m, x.stride(0), x.stride(1), *_strides(w_gate), *_strides(w_up),
        h.stride(0), h.stride(1), BITS=w_gate.bits, GROUP=g_gu, TOP_K=k, **flags, **opts)

    flags = gemm_flags({**cfg, "BLOCK_K": block_k_for(cfg["BLOCK_K"], g_d, I)}, x.dtype)
    moe_down_wint_kernel[(num_pid_m * triton.cdiv(H, BN),)](
        h, w_down.data, w_down.scales, y, w_flat, sorted_ids, expert_ids, num_post, H, I, n, num_pid_m,
        h.stride(0), h.stride(1), *_strides(w_down), y.stride(0), y.stride(1),
        BITS=w_down.bits, GROUP=g_d, **flags, **opts)


def _split(config) -> tuple:
    """(expert tile buckets, the shared MLP's config) from a packed moe config."""
    config = dict(config or {})
    shared = config.pop("shared", None)
    return normalize_config(config), shared


def make_moe_experts_wint(config=None):
    """-> moe_experts(x [T, H], topk_weights [T, k], topk_ids [T, k], w_gate, w_up, w_down)."""
    buckets, _ = _split(config)

    def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate, w_up, w_down):
        return _launch_experts(buckets, x, topk_weights, topk_ids, w_gate, w_up, w_down, gemms=_packed_gemms)

    return moe_experts


def make_moe_wint(config=None):
    """-> moe(x, router_weight, correction_bias, w_gate, w_up, w_down, top_k, norm_min, shared=None):
    route, packed routed experts, packed shared experts (weight 1), combined in one kernel."""
    buckets, shared_cfg = _split(config)
    shared_mlp = make_swiglu_mlp_wint(shared_cfg)

    def moe(x: torch.Tensor, router_weight: torch.Tensor, correction_bias, w_gate, w_up, w_down, top_k: int,
            norm_min: float, shared=None) -> torch.Tensor:
        weights, ids = _launch_route(x, router_weight, correction_bias, top_k, norm_min)
        shared_out = None if shared is None else shared_mlp(x, *shared)
        return _launch_experts(buckets, x, weights, ids, w_gate, w_up, w_down, shared_out, gemms=_packed_gemms)

    return moe
