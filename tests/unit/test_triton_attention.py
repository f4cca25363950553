"""kernels/triton paged GQA attention (prefill, chunked prefill, split decode) and fused
RoPE + KV-cache write against kernels/reference, on CPU tensors under the Triton interpreter.

Each dtype carries its own tolerance; each parametrized shape names the edge it covers. Tiny
shapes and tiles: the interpreter runs every program in numpy. bf16 runs where it only tests
loads, casts and stores (the kernels upcast before any arithmetic).
"""

import os

_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates any kernel

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ernie_hal.core.runtime.kvcache import KVCache  # noqa: E402
from ernie_hal.kernels import reference as ref  # noqa: E402
from ernie_hal.kernels.triton import _interpret  # noqa: E402
from ernie_hal.kernels.triton.attention import make_gqa_attention, normalize_config  # noqa: E402
from ernie_hal.kernels.triton.rope_kv import make_rope, make_rope_kv_write  # noqa: E402

# Leave the variable as found for the rest of the session (subprocess tests inherit it); the
# fixture sets it while these tests run.
if _OLD_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET")
else:
    os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not _interpret.INTERPRET:
        pytest.skip("kernels/triton was imported without TRITON_INTERPRET=1 earlier in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# (atol, rtol) per dtype for O(1) outputs.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# Small tiles so tiny shapes still cross tile, block and partition boundaries.
CUDA_LIKE = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 3,
             "PARTITION_SIZE": 32, "DECODE_PROGRAMS": 64, "DECODE_BLOCK_N": 16,
             "decode_num_warps": 4, "decode_num_stages": 2}
AMD_LIKE = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1,
            "PARTITION_SIZE": 16, "DECODE_BLOCK_N": 16, "decode_num_warps": 4,
            "decode_num_stages": 1, "waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2}
CONFIGS = {"cuda": CUDA_LIKE, "amd": AMD_LIKE}
ROPE_CONFIGS = {"cuda": {"num_warps": 4}, "amd": {"num_warps": 4, "num_stages": 1, "waves_per_eu": 2,
                                                  "matrix_instr_nonkdim": 16, "kpack": 2}}
THETA = 500000.0


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def paged_batch(q_lens, ctx_lens, nh, nkv, d, bs, dtype, seed=0, cache_dtype=None):
    """Random q and caches; each sequence's blocks scattered through the cache in shuffled
    order, block tables one column wider than needed (padded with 0, as KVCache pads)."""
    g = torch.Generator().manual_seed(seed)
    nbs = [-(-c // bs) for c in ctx_lens]
    num_blocks = sum(nbs) + 3
    cache_dtype = cache_dtype or dtype
    q = torch.randn(sum(q_lens), nh, d, generator=g).to(dtype)
    k_cache = torch.randn(num_blocks, bs, nkv, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_blocks, bs, nkv, d, generator=g).to(cache_dtype)
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.zeros(len(q_lens), max(nbs) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(nbs):
        block_tables[b, :n] = perm[used:used + n]
        used += n
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, block_tables, context_lens, query_start_loc


def check_attention(cfg, q_lens, ctx_lens, nh, nkv, d, bs, dtype, cache_dtype=None):
    args = paged_batch(q_lens, ctx_lens, nh, nkv, d, bs, dtype, cache_dtype=cache_dtype)
    scale = d ** -0.5
    out = make_gqa_attention(cfg)(*args, scale)
    close(out, ref.gqa_attention(*args, scale), dtype)


# (q_lens, ctx_lens, nh, nkv, d, block_size)
PREFILL = {
    "T<BLOCK_M": ([5], [5], 4, 2, 16, 16),
    "ctx crosses blocks, tiles span blocks": ([21], [21], 4, 1, 16, 4),
    "many q tiles, unmasked + diagonal key tiles": ([40], [40], 4, 2, 16, 8),
    "ragged batch incl. a 1-token prompt": ([3, 9, 1, 12], [3, 9, 1, 12], 4, 2, 16, 4),
    "chunked prefill, cached prefix": ([4, 6], [19, 30], 4, 2, 16, 4),
    "nkv == nh": ([7, 3], [7, 11], 3, 3, 16, 4),
    "G = 5 (21B), rows padded": ([6], [9], 10, 2, 16, 4),
    "head_dim 128": ([6, 2], [6, 9], 4, 2, 128, 16),
    "block_size 16, head_dim 32": ([18], [30], 4, 2, 32, 16),
    "head_dim 24, not a power of two": ([5], [7], 2, 1, 24, 4),
}
DECODE = {
    "one partition": ([1, 1], [5, 13], 4, 2, 16, 4),
    "multiple partitions + reduce": ([1, 1, 1], [70, 1, 33], 4, 2, 16, 4),
    "head_dim 128, nkv == nh": ([1, 1], [40, 9], 2, 2, 128, 16),
    "G = 5, block_size 16": ([1, 1], [50, 17], 10, 2, 16, 16),
}


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", PREFILL, ids=str)
def test_prefill(case, dtype, cfg):
    check_attention(CONFIGS[cfg], *PREFILL[case], dtype)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", DECODE, ids=str)
def test_decode(case, dtype, cfg):
    check_attention(CONFIGS[cfg], *DECODE[case], dtype)


def _live_splits(ctx, min_part, num_parts, block_n):
    """kernels' _split_size in Python: how many partitions a context of ctx keys fills."""
    n_split = min(max(-(-ctx // min_part), 1), num_parts)
    size = -(-(-(-ctx // n_split)) // block_n) * block_n
    return -(-ctx // size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_decode_splits_from_real_lengths_in_a_full_width_table(dtype, monkeypatch):
    """A decode graph's block table is as wide as the longest context allowed; short and long
    sequences then split by their own lengths over the fixed grid, and the reduce merges more
    partials than one tile holds."""
    from ernie_hal.kernels.triton import attention as attn
    monkeypatch.setattr(attn, "REDUCE_TILE", 2)
    cfg = {**CUDA_LIKE, "PARTITION_SIZE": 16, "DECODE_PROGRAMS": 4096}
    q, k, v, bt, ctx, qsl = paged_batch([1, 1, 1, 1], [3, 40, 200, 17], 4, 2, 16, 8, dtype)
    wide = torch.zeros(4, 64, dtype=torch.int32)          # capacity 512 keys, as a graph's table
    wide[:, :bt.shape[1]] = bt
    out = attn.make_gqa_attention(cfg)(q, k, v, wide, ctx, qsl, 0.25)
    close(out, ref.gqa_attention(q, k, v, wide, ctx, qsl, 0.25), dtype)
    num_parts = 512 // 16
    # the 200-key sequence fills 13 partitions of 16 keys; the 3-key one, one
    assert [_live_splits(c, 16, num_parts, 16) for c in (3, 40, 200, 17)] == [1, 3, 13, 2]


@pytest.mark.parametrize("case", ["ragged", "decode split"])
def test_bf16_load_store(case):
    shape = (PREFILL["ragged batch incl. a 1-token prompt"] if case == "ragged"
             else DECODE["multiple partitions + reduce"])
    check_attention(CUDA_LIKE, *shape, torch.bfloat16)


def test_mixed_dtypes_default_config():
    """fp32 queries over a bf16 cache (fp32 dots); the default config (decode in one partition)."""
    check_attention(None, [3, 1], [8, 20], 4, 2, 16, 4, torch.float32, cache_dtype=torch.bfloat16)
    check_attention(None, [1, 1], [8, 20], 4, 2, 16, 4, torch.float16)


def test_strided_q():
    """q as a view of a fused qkv projection (token stride != nh * d)."""
    q, kc, vc, bt, ctx, qsl = paged_batch([4, 3], [4, 10], 4, 2, 16, 4, torch.float32)
    fused = torch.randn(q.shape[0], 8 * 16)
    fused[:, :64] = q.reshape(-1, 64)
    qv = fused[:, :64].view(-1, 4, 16)
    close(make_gqa_attention(CUDA_LIKE)(qv, kc, vc, bt, ctx, qsl, 0.25),
          ref.gqa_attention(q, kc, vc, bt, ctx, qsl, 0.25), torch.float32)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown config keys"):
        make_gqa_attention({"BLOCK_MM": 16})
    with pytest.raises(ValueError, match="power of two"):
        make_gqa_attention({"BLOCK_N": 24})
    with pytest.raises(ValueError, match="multiple of DECODE_BLOCK_N"):
        make_gqa_attention({"PARTITION_SIZE": 40, "DECODE_BLOCK_N": 16})
    assert normalize_config({"BLOCK_M": 32})["BLOCK_M"] == 32
    # Under the interpreter the AMD extras reach the launch, which drops what it does not know.
    assert _interpret.launch_options(AMD_LIKE) == {
        "num_warps": 4, "num_stages": 1, "waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2}


# ---- RoPE ------------------------------------------------------------------------------------

# (T, nh, nkv, d)
ROPE = {
    "tiny, G = 2": (5, 4, 2, 16),
    "head_dim 128, 20/4 heads (21B), not powers of two": (3, 20, 4, 128),
    "nkv == nh, head_dim 24": (4, 3, 3, 24),
}


def positions_for(T):
    """Include large positions: the fp32 angles must match the reference's exactly."""
    return torch.tensor([0, 1, 7, 131071, 99991, 4096][:T] + [17] * max(0, T - 6))


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("case", ROPE, ids=str)
def test_rope(case, dtype):
    T, nh, nkv, d = ROPE[case]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(T, nh, d, generator=g).to(dtype)
    k = torch.randn(T, nkv, d, generator=g).to(dtype)
    pos = positions_for(T)
    q_rot, k_rot = make_rope(ROPE_CONFIGS["amd"] if nh == 20 else None)(q, k, pos, THETA)
    q_ref, k_ref = ref.rope(q, k, pos, THETA)
    close(q_rot, q_ref, dtype)
    close(k_rot, k_ref, dtype)


@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16], ids=["same", "bf16 cache"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_rope_kv_write(dtype, cache_dtype):
    """Strided q/k/v (views of one fused qkv row), slots out of order across blocks."""
    T, nh, nkv, d, bs = 6, 4, 2, 16, 4
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(T, (nh + 2 * nkv) * d, generator=g).to(dtype)
    q = qkv[:, :nh * d].view(T, nh, d)
    k = qkv[:, nh * d:(nh + nkv) * d].view(T, nkv, d)
    v = qkv[:, (nh + nkv) * d:].view(T, nkv, d)
    pos = positions_for(T)
    slots = torch.tensor([13, 3, 4, 22, 0, 7])
    caches = [torch.randn(6, bs, nkv, d, generator=g).to(cache_dtype or dtype) for _ in range(2)]
    k_c, v_c = (c.clone() for c in caches)
    k_r, v_r = (c.clone() for c in caches)
    q_rot = make_rope_kv_write({"num_warps": 2})(
        q, k, v, pos, THETA, k_c, v_c, slots)
    q_ref = ref.rope_kv_write(q, k, v, pos, THETA, k_r, v_r, slots)
    close(q_rot, q_ref, dtype)
    close(k_c, k_r, cache_dtype or dtype)
    assert torch.equal(v_c, v_r)


def test_rope_kv_write_skips_padding_slots():
    T, nh, nkv, d = 3, 2, 1, 16
    q, k, v = torch.randn(T, nh, d), torch.randn(T, nkv, d), torch.randn(T, nkv, d)
    k_c, v_c = torch.zeros(2, 4, nkv, d), torch.zeros(2, 4, nkv, d)
    make_rope_kv_write()(q, k, v, torch.arange(T), THETA, k_c, v_c, torch.tensor([5, -1, 2]))
    k_r, v_r = torch.zeros_like(k_c), torch.zeros_like(v_c)
    ref.rope_kv_write(q[[0, 2]], k[[0, 2]], v[[0, 2]], torch.tensor([0, 2]), THETA, k_r, v_r,
                      torch.tensor([5, 2]))
    close(k_c, k_r, torch.float32)
    assert torch.equal(v_c, v_r)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_steps_through_kvcache(cfg):
    """Engine-shaped steps from KVCache.prepare: a ragged prefill, a chunked prefill next to
    a decode, then two decode steps; fused rope+write then attention each step, against the
    reference pair on a twin cache."""
    nh, nkv, d, bs = 4, 2, 16, 4
    caches = [KVCache(1, 24, bs, nkv, d, torch.float32, "cpu") for _ in range(2)]
    rope_kv_write, attention = make_rope_kv_write(ROPE_CONFIGS[cfg]), make_gqa_attention(CONFIGS[cfg])
    g = torch.Generator().manual_seed(3)
    for c in caches:
        c.add_sequence(0)
        c.add_sequence(1)
    for seqs, counts in [([0, 1], [9, 5]), ([0, 1], [1, 7]), ([0, 1], [1, 1]), ([1, 0], [1, 1])]:
        T = sum(counts)
        q, k, v = (torch.randn(T, n, d, generator=g) for n in (nh, nkv, nkv))
        outs = []
        for c, (write, attend) in zip(caches, [(rope_kv_write, attention),
                                                (ref.rope_kv_write, ref.gqa_attention)]):
            md = c.prepare(seqs, counts)
            k_cache, v_cache = c.layer(0)
            q_rot = write(q, k, v, md.positions, THETA, k_cache, v_cache, md.slot_mapping)
            outs.append(attend(q_rot, k_cache, v_cache, md.block_tables, md.context_lens,
                               md.query_start_loc, d ** -0.5))
        close(outs[0], outs[1], torch.float32)
        close(caches[0].k[0], caches[1].k[0], torch.float32)


ATTN_COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ernie_hal.kernels.triton import attention_kernels as ak

def sig(types, consts):
    s = {}
    for name in types.split():
        n, _, t = name.partition(":")
        s[n] = t or "i32"
    s.update({k: "constexpr" for k in consts})
    return s

STRIDES = ("stride_qt stride_qh stride_qd stride_ot stride_oh stride_od stride_kb stride_kt stride_kh "
           "stride_kd stride_vb stride_vt stride_vh stride_vd stride_bt")

def compile_all(target, opts, dt):
    p = "*" + dt
    dec = dict(G=5, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_H=16, BLOCK_N=64, FP32_DOT=False)
    jobs = [
        (ak.decode_attention_kernel, f"q_ptr:{p} k_cache_ptr:{p} v_cache_ptr:{p} out_ptr:*fp32 m_ptr:*fp32 "
         f"l_ptr:*fp32 bt_ptr:*i32 ctx_ptr:*i32 qk_scale:fp32 {STRIDES} min_part num_parts",
         dict(dec, ONE_PART=False)),
        (ak.decode_attention_kernel, f"q_ptr:{p} k_cache_ptr:{p} v_cache_ptr:{p} out_ptr:{p} m_ptr:{p} "
         f"l_ptr:{p} bt_ptr:*i32 ctx_ptr:*i32 qk_scale:fp32 {STRIDES} min_part num_parts",
         dict(dec, ONE_PART=True)),
        (ak.decode_reduce_kernel, f"part_ptr:*fp32 m_ptr:*fp32 l_ptr:*fp32 out_ptr:{p} ctx_ptr:*i32 nh "
         "num_parts min_part stride_ot stride_oh stride_od", dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64,
                                                                   BLOCK_P=16)),
    ]
    for fn, types, consts in jobs:
        src = ASTSource(fn=fn, signature=sig(types, consts), constexprs=consts)
        triton.compile(src, target=target, options=opts)
        print(target.backend, dt, fn.__name__, "ok", flush=True)

compile_all(GPUTarget("cuda", 90, 32), dict(num_warps=4, num_stages=2), "bf16")
compile_all(GPUTarget("hip", "gfx942", 64), dict(num_warps=4, num_stages=1, waves_per_eu=2), "fp16")
'''


def test_decode_kernels_compile_for_sm90_and_gfx942():
    """The interpreter skips the compiler: build the split decode and its tiled reduce for real
    targets (no GPU needed; a subprocess, since this process's kernels are interpreted)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", ATTN_COMPILE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.count(" ok") == 6, r.stdout
