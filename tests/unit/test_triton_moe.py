"""kernels/triton MoE (router, align, grouped SwiGLU experts, combine) against kernels/reference,
on CPU tensors under the Triton interpreter.

Each dtype carries its own tolerance; each parametrized shape names the edge it covers. Tiny
shapes: the interpreter runs every program in numpy.
"""

import os

_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates any kernel

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ernie_hal.kernels import reference as ref  # noqa: E402
from ernie_hal.kernels.triton import _interpret  # noqa: E402
from ernie_hal.kernels.triton.moe import (make_moe, make_moe_experts, make_moe_route,  # noqa: E402
                                          pick_config)
from ernie_hal.kernels.triton.moe_align import (moe_align_block_size,  # noqa: E402
                                                moe_align_block_size_torch)

# Leave the variable as found for the rest of the session (subprocess tests inherit it); the
# fixture below sets it while these tests run, since the interpreter reads it at call time too.
if _OLD_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET")
else:
    os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.fixture(autouse=True)
def _interpreter(request, monkeypatch):
    if request.node.originalname == "test_kernels_compile_for_sm90_and_gfx942":
        return  # a subprocess with the real compiler
    problem = _interpret.interpreter_problem()
    if problem:  # another module imported triton first: run this file alone, or set it earlier
        pytest.skip(problem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# (atol, rtol) per dtype, for O(1) outputs (the reference rounds after every expert's add).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2.5e-2, 2e-2)}
DTYPES = list(TOL)

CUDA_LIKE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4,
             "num_stages": 3}
AMD_LIKE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4,
            "num_stages": 2, "waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2}
# Decode bucket (T <= 8) and prefill bucket, as a tuned JSON file would give them.
BUCKETED = {"8": {**CUDA_LIKE, "BLOCK_N": 16},
            "4096": {**CUDA_LIKE, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 2}}
CONFIGS = {"cuda": CUDA_LIKE, "amd": AMD_LIKE, "bucketed": BUCKETED}


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def rand(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_layer(T, H, I, E, shared, dtype, seed):
    """x [T, H], fp32 router + bias, experts scaled for O(1) outputs, shared of width shared*I."""
    g = torch.Generator().manual_seed(seed)
    x = rand(T, H, dtype=dtype, gen=g)
    router = rand(E, H, gen=g, scale=H ** -0.5)
    bias = rand(1, E, gen=g, scale=0.05)
    w_gate, w_up = (rand(E, I, H, dtype=dtype, gen=g, scale=H ** -0.5) for _ in range(2))
    w_down = rand(E, H, I, dtype=dtype, gen=g, scale=I ** -0.5)
    sh = None
    if shared:
        S = shared * I
        sh = (rand(S, H, dtype=dtype, gen=g, scale=H ** -0.5),
              rand(S, H, dtype=dtype, gen=g, scale=H ** -0.5),
              rand(H, S, dtype=dtype, gen=g, scale=S ** -0.5))
    return x, router, bias, w_gate, w_up, w_down, sh


# ---- align ----------------------------------------------------------------------------------

def check_alignment(align, topk_ids, block_m, E):
    sorted_ids, expert_ids, num_post = align(topk_ids, block_m, E)
    n = topk_ids.numel()
    flat = topk_ids.reshape(-1)
    used = int(num_post)
    assert used % block_m == 0 and sorted_ids.numel() % block_m == 0
    assert sorted_ids.numel() // block_m == expert_ids.numel()
    real = sorted_ids[:used][sorted_ids[:used] < n]
    assert sorted(real.tolist()) == list(range(n))                  # every entry exactly once
    assert bool((sorted_ids[used:] == n).all()) and bool((expert_ids[used // block_m:] == -1).all())
    counts = torch.bincount(flat, minlength=E)
    blocks = expert_ids[:used // block_m]
    for e in range(E):                                              # zero-token experts: no block
        assert int((blocks == e).sum()) == -(-int(counts[e]) // block_m)
    for b, e in enumerate(blocks.tolist()):
        chunk = sorted_ids[b * block_m:(b + 1) * block_m].long()
        chunk = chunk[chunk < n]
        assert len(chunk) and bool((flat[chunk] == e).all())
        assert chunk.tolist() == sorted(chunk.tolist())              # token order kept


@pytest.mark.parametrize("ids,block_m,E", [
    ([[2], [0], [2], [2], [1]], 2, 4),                  # the docstring's example, expert 3 empty
    ([[0, 1, 2, 3, 4]], 16, 5),                         # T=1, k == E, every run padded
    ("random", 4, 7),                                    # odd E, several blocks per expert
    ("random", 16, 64),                                  # 21B's E, more entries than one CHUNK
])
def test_align(ids, block_m, E):
    if ids == "random":
        ids = torch.randint(0, E, (50 if E < 64 else 300, 3),
                            generator=torch.Generator().manual_seed(0))
    ids = torch.as_tensor(ids)
    check_alignment(moe_align_block_size_torch, ids, block_m, E)
    check_alignment(moe_align_block_size, ids, block_m, E)          # the Triton kernel
    for a, b in zip(moe_align_block_size(ids, block_m, E),
                    moe_align_block_size_torch(ids, block_m, E)):
        assert torch.equal(a, b)


# ---- router ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,bias,norm_min", [
    (1, 5, 2, True, 1e-12),      # T=1 decode, odd E
    (37, 7, 7, True, 1e-12),     # k == E, odd E, T not a power of two
    (20, 64, 6, False, 1e-12),   # 21B's E and k, no correction bias
    (9, 16, 1, True, 0.9),       # k=1: the clamp(min=norm_min) is active
])
def test_route(dtype, T, E, k, bias, norm_min):
    x, router, b, *_ = make_layer(T, 48, 16, E, 0, dtype, seed=T + E)
    b = b * 4 if bias else None                         # a bias large enough to change picks
    w, ids = make_moe_route()(x, router, b, k, norm_min)
    w_ref, ids_ref = ref.moe_route(x, router, b, k, norm_min)
    assert ids.dtype == torch.int64 and torch.equal(ids, ids_ref)
    close(w, w_ref, dtype)


def test_route_rejects_k_above_e():
    x, router, *_ = make_layer(2, 48, 16, 4, 0, torch.float32, seed=0)
    with pytest.raises(ValueError, match="top_k"):
        make_moe_route()(x, router, None, 5, 1e-12)


# ---- experts and the whole block ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,I,E,k,shared,config", [
    (1, 48, 40, 5, 2, 0, "cuda"),     # T=1 decode, odd E, 3 experts with zero tokens, H % BLOCK_K
    (5, 64, 32, 7, 7, 0, "amd"),      # k == E, odd E, T < BLOCK_M, AMD launch options
    (24, 48, 40, 8, 2, 2, "cuda"),    # shared experts = 2 (width 2*I), several blocks per expert
    (40, 32, 48, 4, 1, 0, "bucketed"),  # prefill bucket (BLOCK_M=32), I % BLOCK_N, k=1
    (3, 32, 16, 6, 2, 1, "bucketed"),   # decode bucket, shared = 1
    (70, 64, 64, 16, 4, 0, None),       # default config (T <= 1024 bucket), exact tile multiples
])
def test_moe(dtype, T, H, I, E, k, shared, config):
    x, router, bias, wg, wu, wd, sh = make_layer(T, H, I, E, shared, dtype, seed=T * 7 + E)
    out = make_moe(CONFIGS.get(config))(x, router, bias, wg, wu, wd, k, 1e-12, sh)
    close(out, ref.moe(x, router, bias, wg, wu, wd, k, 1e-12, sh), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_with_empty_experts_and_strided_weights(dtype):
    # Experts 1 and 4 get no token; weights are views with non-unit strides (as staged slices).
    T, H, I, E, k = 12, 48, 40, 5, 2
    x, _, _, wg, wu, wd, _ = make_layer(T, H, I, E, 0, dtype, seed=3)
    ids = torch.tensor([[0, 2], [3, 0], [2, 3]] * 4)
    w = torch.softmax(rand(T, k, gen=torch.Generator().manual_seed(4)), -1).to(dtype)
    wgu = torch.cat([wg, wu], dim=1)                                # [E, 2I, H] fused storage
    wd_t = wd.transpose(1, 2).contiguous().transpose(1, 2)          # [E, H, I], stride(1) == 1
    out = make_moe_experts(CUDA_LIKE)(x, w, ids, wgu[:, :I], wgu[:, I:], wd_t)
    close(out, ref.moe_experts(x, w, ids, wg, wu, wd), dtype)


def test_zero_tokens():
    x, router, bias, wg, wu, wd, _ = make_layer(0, 32, 16, 4, 0, torch.float32, seed=0)
    assert make_moe()(x, router, bias, wg, wu, wd, 2, 1e-12).shape == (0, 32)


# ---- configs --------------------------------------------------------------------------------

def test_pick_config_buckets():
    assert pick_config(BUCKETED, 1)["BLOCK_N"] == 16
    assert pick_config(BUCKETED, 9)["BLOCK_M"] == 32
    assert pick_config(BUCKETED, 10 ** 6)["BLOCK_M"] == 32           # above every key: largest
    assert pick_config({"BLOCK_N": 128}, 1)["BLOCK_N"] == 128         # flat: missing keys default
    assert pick_config(None, 1)["BLOCK_M"] == 16 and pick_config(None, 4096)["BLOCK_M"] == 64


@pytest.mark.parametrize("bad", [{"num_warp": 8},                   # typo the interpreter ignores
                                 {"BLOCK_M": 8},                    # below tl.dot's 16
                                 {"4": {"BLOCK_K": 48}}])           # not a power of two, bucketed
def test_bad_config_rejected(bad):
    with pytest.raises(ValueError):
        make_moe(bad)


def test_launch_options_by_target(monkeypatch):
    # The interpreter drops unknown launch keywords, a CUDA launch raises KeyError on AMD ones:
    # they go to HIP and the interpreter, and are dropped for CUDA.
    amd = {"waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2}
    assert _interpret.launch_options(AMD_LIKE) == {"num_warps": 4, "num_stages": 2, **amd}
    monkeypatch.setattr(_interpret, "target_backend", lambda: "cuda")
    assert _interpret.launch_options(AMD_LIKE) == {"num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(_interpret, "target_backend", lambda: "hip")
    assert _interpret.launch_options(AMD_LIKE) == {"num_warps": 4, "num_stages": 2, **amd}


# ---- the same kernels through the real compiler ---------------------------------------------

COMPILE_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ernie_hal.kernels.triton import moe_kernels as mk, norm_kernels as nk, swiglu_kernels as sk

def sig(types, consts):
    s = {}
    for name in types.split():
        n, _, t = name.partition(":")
        s[n] = t or "i32"
    s.update({k: "constexpr" for k in consts})
    return s

def compile_all(target, opts, dt):
    p = "*" + dt
    jobs = [
        (sk.swiglu_kernel, f"g_ptr:{p} u_ptr:{p} o_ptr:{p} N stride_g stride_u stride_o",
         dict(BLOCK_N=1024)),
        (nk.rms_norm_kernel, f"x_ptr:{p} r_ptr:{p} w_ptr:{p} y_ptr:{p} s_ptr:{p} H stride_x "
         "stride_r stride_y stride_s eps:fp32", dict(HAS_RESIDUAL=True, BLOCK_H=4096)),
        (mk.moe_router_kernel, f"logits_ptr:*fp32 x_ptr:{p} wr_ptr:*fp32 bias_ptr:*fp32 w_ptr:{p} "
         "ids_ptr:*i64 T E H stride_l stride_x stride_wr norm_min:fp32",
         dict(TOP_K=6, HAS_BIAS=True, BLOCK_T=64, BLOCK_E=64, BLOCK_SLOTS=8, FUSED=False, BLOCK_H=16)),
        (mk.moe_router_kernel, f"logits_ptr:*fp32 x_ptr:{p} wr_ptr:*fp32 bias_ptr:*fp32 w_ptr:{p} "
         "ids_ptr:*i64 T E H stride_l stride_x stride_wr norm_min:fp32",
         dict(TOP_K=6, HAS_BIAS=True, BLOCK_T=1, BLOCK_E=64, BLOCK_SLOTS=8, FUSED=True, BLOCK_H=128)),
        (mk.moe_align_kernel, "ids_ptr:*i64 sorted_ids_ptr:*i32 expert_ids_ptr:*i32 "
         "num_post_ptr:*i32 n E num_blocks", dict(BLOCK_M=16, BLOCK_E=64, CHUNK=128, CHUNK_B=16)),
        (mk.moe_gate_up_kernel, f"x_ptr:{p} wg_ptr:{p} wu_ptr:{p} h_ptr:{p} sorted_ids_ptr:*i32 "
         "expert_ids_ptr:*i32 num_post_ptr:*i32 N K num_valid num_pid_m stride_xm stride_xk "
         "stride_ge stride_gn stride_gk stride_ue stride_un stride_uk stride_hm stride_hn",
         dict(TOP_K=6, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, DOT_FP32=False,
              IEEE=dt == "fp32")),
        (mk.moe_down_kernel, f"h_ptr:{p} wd_ptr:{p} y_ptr:{p} topk_w_ptr:{p} sorted_ids_ptr:*i32 "
         "expert_ids_ptr:*i32 num_post_ptr:*i32 N K num_valid num_pid_m stride_hm stride_hk "
         "stride_de stride_dn stride_dk stride_ym stride_yn",
         dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, DOT_FP32=False, IEEE=dt == "fp32")),
        (mk.moe_combine_kernel, f"y_ptr:{p} shared_ptr:{p} out_ptr:{p} N stride_ym stride_sm "
         "stride_om", dict(TOP_K=8, HAS_SHARED=True, BLOCK_N=1024)),
    ]
    for fn, types, consts in jobs:
        src = ASTSource(fn=fn, signature=sig(types, consts), constexprs=consts)
        triton.compile(src, target=target, options=opts)
        print(target.backend, dt, fn.__name__, "ok", flush=True)

compile_all(GPUTarget("cuda", 90, 32), dict(num_warps=4, num_stages=3), "bf16")
compile_all(GPUTarget("hip", "gfx942", 64),
            dict(num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16, kpack=2),
            "fp16")
'''


def test_kernels_compile_for_sm90_and_gfx942():
    # The interpreter skips the compiler, so a kernel can pass above and still fail to build on
    # a GPU. Triton compiles for a named target without one (ptxas and lld ship in the wheel);
    # a subprocess, since this process's kernels are interpreter functions.
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.count(" ok") == 16, r.stdout


# ---- long prefill: expert GEMMs chunked over tokens into reused intermediates ---------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_long_prefill_equals_one_pass_and_keeps_intermediates_small(dtype, monkeypatch):
    from ernie_hal.kernels.triton import moe as moe_mod
    x, router, bias, w_gate, w_up, w_down, sh = make_layer(23, 48, 16, 6, 1, dtype, seed=5)
    whole = make_moe(CUDA_LIKE)(x, router, bias, w_gate, w_up, w_down, 2, 1e-12, shared=sh)
    sizes = []
    real_empty = torch.empty

    def watch(*shape, **kw):
        t = real_empty(*shape, **kw)
        sizes.append(t.numel())
        return t
    monkeypatch.setattr(moe_mod, "CHUNK_TOKENS", 5)             # 23 tokens: chunks 5,5,5,5,3
    monkeypatch.setattr(moe_mod.torch, "empty", watch)
    chunked = make_moe(CUDA_LIKE)(x, router, bias, w_gate, w_up, w_down, 2, 1e-12, shared=sh)
    monkeypatch.setattr(moe_mod.torch, "empty", real_empty)
    # The same tiles in another token order: equal up to fp32 round-off, since the interpreter's
    # fp32 tl.dot is numpy's matmul, whose BLAS kernel may sum a row in another order when the
    # rows sharing its tile change (1 ulp on an AVX2 host; bit-equal on AVX-512 and in fp16).
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    close(chunked, ref.moe(x, router, bias, w_gate, w_up, w_down, 2, 1e-12, shared=sh), dtype)
    # h [5*2, 16] and y [5*2, 48] once each, never [23*2, ...]
    assert sizes.count(5 * 2 * 16) == 1 and sizes.count(5 * 2 * 48) == 1
    assert 23 * 2 * 16 not in sizes and 23 * 2 * 48 not in sizes
