"""Fused MoE wrappers with the reference signatures (kernels/reference/moe.py):

    make_moe_route(config)   -> moe_route(x, router_weight, correction_bias, top_k, norm_min)
                                -> (weights [T, k] x.dtype, ids [T, k] int64)
    make_moe_experts(config) -> moe_experts(x, topk_weights, topk_ids, w_gate, w_up, w_down)
    make_moe(config)         -> moe(x, router_weight, correction_bias, w_gate, w_up, w_down,
                                    top_k, norm_min, shared=None)

w_gate/w_up [E, I, H], w_down [E, H, I] (any strides); shared is None or (g, u, d) of one SwiGLU
MLP, run with torch GEMMs + the SwiGLU kernel and added inside the combine kernel.

One call: router logits by a torch fp32 GEMM (bit-identical to the reference's on the same
device, so the selection is the reference's up to softmax rounding at exact near-ties), or for
decode-sized T (<= FUSED_ROUTER_MAX_T) inside the router kernel itself (fp32, another summation
order: a pick can differ from the reference's only at a near-tie) -> router kernel (softmax, biased top-k, unbiased gather, renormalise) -> moe_align_block_size
(one Triton launch up to 4096 entries, torch sort above) -> gate+up kernel (SwiGLU fused, writes
h [T*k, I]) -> down kernel (routing weight applied, y [T*k, H]) -> combine kernel (sum over k,
+ shared). Nothing waits for the device (meant for CUDA/HIP graph capture; not yet tried).
Expert ids are trusted (not range-checked on the device).

Config: a flat dict, used for every token count, or buckets keyed by the largest token count T
each serves ({32: decode_cfg, 1024: mid_cfg, 65536: prefill_cfg}; keys may be digit strings,
as in JSON; a T above every key takes the largest key's config). A flat config has:
    BLOCK_M, BLOCK_N, BLOCK_K   tile of the grouped GEMMs (powers of two, >= 16); both expert
                                launches use the same tile, N = I for gate+up and H for down
    GROUP_M                     super-row swizzle (1 = none)
    num_warps, num_stages       launch options
    waves_per_eu, matrix_instr_nonkdim, kpack   AMD only; passed when present and the target is
                                HIP (or the interpreter, which ignores them), dropped on CUDA
Missing keys fall back to DEFAULT_CONFIG's bucket for that T.

Long prefills run the expert GEMMs CHUNK_TOKENS tokens at a time into one pair of intermediates
(h [chunk*k, I], y [chunk*k, H]) reused by every chunk, as vLLM's fused_moe does: a 128K-token
prefill of a 300B-class MoE would otherwise allocate ~25 GB for h and y. Every chunk uses the
tile config of the whole call's T, so chunked and unchunked results are identical.
"""

import torch
import torch.nn.functional as F
import triton

from ._interpret import AMD_OPTIONS, COMMON_OPTIONS, INTERPRET, check_keys, launch_options
from .moe_align import moe_align_block_size
from .moe_kernels import moe_combine_kernel, moe_down_kernel, moe_gate_up_kernel, moe_router_kernel
from .swiglu import make_swiglu_mlp

TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
CONFIG_KEYS = (*TILE_KEYS, *COMMON_OPTIONS, *AMD_OPTIONS)

# Starting points in the spirit of vLLM's untuned defaults: short M blocks while experts see few
# tokens each (decode: T*k/E is a handful), longer ones for prefill. Backends pass tuned ones.
DEFAULT_CONFIG = {
    32: {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4,
         "num_stages": 3},
    1024: {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
           "num_stages": 3},
    1 << 30: {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
              "num_stages": 3},
}


def _check_flat(cfg: dict, where: str) -> dict:
    check_keys(cfg, CONFIG_KEYS, where)
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg.get(k)
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{where}: {k}={v} must be a power of two >= 16 (tl.dot)")
    if cfg.get("GROUP_M") is not None and cfg["GROUP_M"] < 1:
        raise ValueError(f"{where}: GROUP_M={cfg['GROUP_M']} must be >= 1")
    return dict(cfg)


def normalize_config(config) -> list:
    """None | flat dict | {max_T: flat dict} -> [(max_T, full flat dict)] sorted by max_T."""
    if not config:
        config = {}
    if config and all(str(k).isdigit() for k in config):
        buckets = sorted((int(k), _check_flat(v, f"moe config[{k}]")) for k, v in config.items())
        return [(max_t, {**_bucket(_DEFAULTS, max_t), **cfg}) for max_t, cfg in buckets]
    cfg = _check_flat(config, "moe config")
    return [(max_t, {**base, **cfg}) for max_t, base in _DEFAULTS]


def _bucket(buckets: list, T: int) -> dict:
    for max_t, cfg in buckets:
        if T <= max_t:
            return cfg
    return buckets[-1][1]


_DEFAULTS = sorted(DEFAULT_CONFIG.items())
CHUNK_TOKENS = 8192       # tokens per expert-GEMM chunk (vLLM's VLLM_FUSED_MOE_CHUNK_SIZE idea)


def gate_up_shared_memory(cfg: dict, itemsize: int = 2) -> int:
    """Shared memory (LDS on AMD) one gate+up program holds: num_stages buffers of the A tile and
    its two B tiles (gate and up). The down kernel holds one B tile, so this bounds both."""
    return cfg["num_stages"] * (cfg["BLOCK_M"] * cfg["BLOCK_K"] + 2 * cfg["BLOCK_K"] * cfg["BLOCK_N"]) * itemsize


def decode_programs(cfg: dict, top_k: int, I: int, H: int) -> tuple:
    """Live programs (gate+up, down) of a one-token step: top_k experts, one M block each."""
    return top_k * triton.cdiv(I, cfg["BLOCK_N"]), top_k * triton.cdiv(H, cfg["BLOCK_N"])


def pick_config(config, T: int) -> dict:
    """The flat config a call with T tokens uses (config as make_moe takes it)."""
    return _bucket(normalize_config(config), T)


FUSED_ROUTER_MAX_T = 16    # up to this many tokens the router GEMM runs inside the router kernel


def _launch_route(x, router_weight, correction_bias, top_k, norm_min):
    T, E = x.shape[0], router_weight.shape[0]
    H = x.shape[1]
    if not 1 <= top_k <= E:
        raise ValueError(f"moe_route: top_k={top_k} must be in [1, E={E}]")
    weights = torch.empty((T, top_k), dtype=x.dtype, device=x.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=x.device)
    if T == 0:
        return weights, ids
    fused = T <= FUSED_ROUTER_MAX_T and x.stride(1) == 1 and router_weight.stride(1) == 1
    block_e = max(16, triton.next_power_of_2(E))
    if fused:     # decode: one launch (the fp32 GEMV inside); [BLOCK_T, BLOCK_E, BLOCK_H] fp32 tile
        logits = None
        block_t = max(1, min(triton.next_power_of_2(T), 4))
        block_h = max(16, min(triton.next_power_of_2(H), 8192 // (block_t * block_e)))
    else:
        logits = F.linear(x.float(), router_weight.float())             # [T, E] fp32
        block_t = max(1, min(triton.next_power_of_2(T), 4096 // block_e))
        block_h = 16
    bias = None if correction_bias is None else correction_bias.reshape(-1).float()
    any_f32 = logits if logits is not None else router_weight
    moe_router_kernel[(triton.cdiv(T, block_t),)](
        any_f32, x, router_weight, bias if bias is not None else any_f32, weights, ids, T, E, H,
        logits.stride(0) if logits is not None else 0, x.stride(0), router_weight.stride(0),
        float(norm_min), TOP_K=top_k, HAS_BIAS=bias is not None, BLOCK_T=block_t,
        BLOCK_E=block_e, BLOCK_SLOTS=triton.next_power_of_2(top_k), FUSED=fused, BLOCK_H=block_h,
        num_warps=4)
    return weights, ids


def _launch_experts(buckets, x, topk_weights, topk_ids, w_gate, w_up, w_down, shared_out=None,
                    gemms=None):
    """Routed experts (+ shared_out [T, H] if given) -> [T, H] in x.dtype. `gemms` launches the
    two grouped GEMMs of a chunk (default: float weights; moe_wint.py passes the packed ones)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, I, H_w = w_gate.shape
    assert H_w == H and w_up.shape == w_gate.shape and w_down.shape == (E, H, I), \
        (x.shape, w_gate.shape, w_up.shape, w_down.shape)
    assert topk_ids.shape == topk_weights.shape == (T, k), (topk_ids.shape, topk_weights.shape)
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    cfg = _bucket(buckets, T)          # the whole call's tiles for every chunk: same results
    chunk = min(T, CHUNK_TOKENS)
    h = torch.empty((chunk * k, I), dtype=x.dtype, device=x.device)    # [chunk*k, I], reused
    y = torch.empty((chunk * k, H), dtype=x.dtype, device=x.device)    # [chunk*k, H], reused
    w_flat = topk_weights.reshape(-1).to(x.dtype).contiguous()          # HF: weight in x.dtype
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        _experts_chunk(cfg, x[t0:t1], w_flat[t0 * k:t1 * k], topk_ids[t0:t1], w_gate, w_up, w_down,
                       h, y, out[t0:t1], None if shared_out is None else shared_out[t0:t1], gemms or _float_gemms)
    return out


def _experts_chunk(cfg, x, w_flat, topk_ids, w_gate, w_up, w_down, h, y, out, shared_out, gemms):
    """align -> gate+up -> down -> combine for one chunk of tokens, into the shared h and y."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E = w_gate.shape[0]
    sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, cfg["BLOCK_M"], E)
    gemms(cfg, x, k, w_flat, sorted_ids, expert_ids, num_post, w_gate, w_up, w_down, h, y)

    block_n = min(1024, triton.next_power_of_2(H))
    moe_combine_kernel[(T, triton.cdiv(H, block_n))](
        y, shared_out if shared_out is not None else y, out, H, y.stride(0),
        shared_out.stride(0) if shared_out is not None else 0, out.stride(0),
        TOP_K=k, HAS_SHARED=shared_out is not None, BLOCK_N=block_n, num_warps=4)


def gemm_flags(cfg: dict, dtype: torch.dtype) -> dict:
    """The tile and precision constexprs both grouped GEMMs take."""
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                DOT_FP32=INTERPRET, IEEE=dtype == torch.float32 and not INTERPRET)


def _float_gemms(cfg, x, k, w_flat, sorted_ids, expert_ids, num_post, w_gate, w_up, w_down, h, y):
    """gate+up (SwiGLU fused) into h, down (routing weight applied) into y: float weights."""
    T, H = x.shape
    I = w_gate.shape[1]
    opts = launch_options(cfg)
    BN = cfg["BLOCK_N"]
    num_pid_m = expert_ids.numel()
    n = T * k
    flags = gemm_flags(cfg, x.dtype)

    moe_gate_up_kernel[(num_pid_m * triton.cdiv(I, BN),)](
        x, w_gate, w_up, h, sorted_ids, expert_ids, num_post, I, H, n, num_pid_m,
        x.stride(0), x.stride(1), *w_gate.stride(), *w_up.stride(), h.stride(0), h.stride(1),
        TOP_K=k, **flags, **opts)

    moe_down_kernel[(num_pid_m * triton.cdiv(H, BN),)](
        h, w_down, y, w_flat, sorted_ids, expert_ids, num_post, H, I, n, num_pid_m,
        h.stride(0), h.stride(1), *w_down.stride(), y.stride(0), y.stride(1), **flags, **opts)


def make_moe_route(config=None):
    """-> moe_route(x, router_weight, correction_bias, top_k, norm_min). The router kernel has
    no tunables; config is accepted for symmetry and validated."""
    normalize_config(config)

    def moe_route(x: torch.Tensor, router_weight: torch.Tensor, correction_bias, top_k: int,
                  norm_min: float):
        return _launch_route(x, router_weight, correction_bias, top_k, norm_min)

    return moe_route


def make_moe_experts(config=None):
    """-> moe_experts(x [T, H], topk_weights [T, k], topk_ids [T, k], w_gate, w_up, w_down)."""
    buckets = normalize_config(config)

    def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
        return _launch_experts(buckets, x, topk_weights, topk_ids, w_gate, w_up, w_down)

    return moe_experts


def make_moe(config=None):
    """-> moe(x, router_weight, correction_bias, w_gate, w_up, w_down, top_k, norm_min,
    shared=None): route, routed experts, shared expert (weight 1), combined in one kernel."""
    buckets = normalize_config(config)
    amd = {k: v for k, v in buckets[-1][1].items() if k in AMD_OPTIONS}
    shared_mlp = make_swiglu_mlp(amd)

    def moe(x: torch.Tensor, router_weight: torch.Tensor, correction_bias, w_gate: torch.Tensor,
            w_up: torch.Tensor, w_down: torch.Tensor, top_k: int, norm_min: float,
            shared=None) -> torch.Tensor:
        weights, ids = _launch_route(x, router_weight, correction_bias, top_k, norm_min)
        shared_out = None if shared is None else shared_mlp(x, *shared)
        return _launch_experts(buckets, x, weights, ids, w_gate, w_up, w_down, shared_out)

    return moe
