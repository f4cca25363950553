"""kernels/reference against float64 math written independently here (and HF modules where cheap).

Each dtype carries its own tolerance; each parametrized shape names the edge it covers.
"""

import math

import pytest
import torch

from ernie_hal.kernels.reference import (OPS, add_rms_norm, embedding, gqa_attention,
                                         kv_cache_write, linear, moe, moe_experts, moe_route,
                                         rms_norm, rope, swiglu_mlp)

# (atol, rtol) per dtype, for O(1) outputs.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2.5e-2, 2e-2)}
DTYPES = list(TOL)


def close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol)


def rand(*shape, dtype=torch.float32, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def test_ops_table_complete():
    from ernie_hal.core.plugins.kernel_table import OPS as NAMES
    assert set(OPS) == set(NAMES)


# ---- norm / linear / mlp --------------------------------------------------------------------

def ref_rms(x, w, eps):
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 64),     # T=1 (decode)
                                 (13, 96)])   # T not a power of two
def test_rms_norm(dtype, T, H):
    x, w, r = rand(T, H, dtype=dtype), rand(H, dtype=dtype), rand(T, H, dtype=dtype)
    close(rms_norm(x, w, 1e-5), ref_rms(x, w, 1e-5), dtype)
    normed, summed = add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(summed, x + r)  # residual add stays in x.dtype
    close(normed, ref_rms(x + r, w, 1e-5), dtype)


def test_rms_norm_matches_hf_bitwise():
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeRMSNorm
    mod = Ernie4_5_MoeRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        mod.weight.copy_(rand(64, dtype=torch.bfloat16))
        x = rand(7, 64, dtype=torch.bfloat16, scale=3)
        assert torch.equal(rms_norm(x, mod.weight, 1e-5), mod(x))


def ref_swiglu(x, g, u, d):
    x, g, u, d = (t.double() for t in (x, g, u, d))
    a = x @ g.T
    return (a * torch.sigmoid(a) * (x @ u.T)) @ d.T


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,I", [(1, 32, 48),    # T=1, I > H
                                   (9, 40, 24)])   # I < H, odd T
def test_swiglu_and_linear(dtype, T, H, I):
    x = rand(T, H, dtype=dtype)
    g, u = rand(I, H, dtype=dtype, scale=H ** -0.5), rand(I, H, dtype=dtype, scale=H ** -0.5)
    d = rand(H, I, dtype=dtype, scale=I ** -0.5)
    close(swiglu_mlp(x, g, u, d), ref_swiglu(x, g, u, d), dtype)
    close(linear(x, g), x.double() @ g.double().T, dtype)


def test_embedding():
    w = rand(10, 4)
    ids = torch.tensor([3, 0, 3, 9])
    assert torch.equal(embedding(ids, w), w[ids])


# ---- rope -----------------------------------------------------------------------------------

def ref_rope(x, positions, theta):
    """Interleaved RoPE as complex multiplication in float64."""
    T, n, d = x.shape
    x = x.double()
    z = torch.complex(x[..., 0::2], x[..., 1::2])                          # [T, n, d/2]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv                                # [T, d/2]
    z = z * torch.polar(torch.ones_like(ang), ang)[:, None, :]
    return torch.stack((z.real, z.imag), -1).reshape(T, n, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,nh,nkv,d,pos0", [
    (1, 4, 4, 8, 37),          # T=1 decode at an offset, nkv == nh
    (6, 16, 2, 128, 0),        # 0.3B shape: head_dim 128 != hidden 1024 / 16 heads
    (5, 6, 3, 64, 1000),       # larger positions, group of 2
])
def test_rope(dtype, T, nh, nkv, d, pos0):
    q, k = rand(T, nh, d, dtype=dtype), rand(T, nkv, d, dtype=dtype)
    pos = torch.arange(pos0, pos0 + T)
    qo, ko = rope(q, k, pos, 500000.0)
    # fp32 angles at position ~1000 carry ~1e-4 absolute error, as in HF.
    scale = 1 + pos0 / 20
    close(qo, ref_rope(q, pos, 500000.0), dtype, scale)
    close(ko, ref_rope(k, pos, 500000.0), dtype, scale)


def test_rope_is_interleaved_not_neox():
    # d=4, theta=1e4: inv_freq = [1, 0.01]. e0 at position 1 rotates inside the pair (0, 1).
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    qo, _ = rope(x, x, torch.tensor([1]), 10000.0)
    c, s = math.cos(1.0), math.sin(1.0)
    torch.testing.assert_close(qo[0, 0], torch.tensor([c, s, 0.0, 0.0]))
    neox = torch.tensor([c, 0.0, s, 0.0])                 # half-split pairs (0, 2), (1, 3)
    assert not torch.allclose(qo[0, 0], neox, atol=1e-3)


def test_rope_matches_hf():
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import apply_rotary_pos_emb
    T, nh, nkv, d, theta = 9, 4, 2, 64, 500000.0
    q, k = rand(T, nh, d, dtype=torch.bfloat16), rand(T, nkv, d, dtype=torch.bfloat16)
    pos = torch.arange(100, 100 + T)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    emb = torch.cat([pos.float()[:, None] * inv] * 2, dim=-1)[None]
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                  emb.cos(), emb.sin())
    qo, ko = rope(q, k, pos, theta)
    # Same fp32 formula; allow one bf16 ulp for a possible FMA contraction difference.
    torch.testing.assert_close(qo, hq[0].transpose(0, 1), atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(ko, hk[0].transpose(0, 1), atol=1e-2, rtol=8e-3)
    assert (qo == hq[0].transpose(0, 1)).float().mean() > 0.99


# ---- kv cache write + attention -------------------------------------------------------------

def ref_attention(q, ks, vs, q_lens, scale):
    """Per sequence: explicit causal softmax in float64 with repeat_interleave'd kv heads."""
    outs, s = [], 0
    for k, v, n in zip(ks, vs, q_lens):
        ctx, nkv = k.shape[0], k.shape[1]
        qq = q[s:s + n].double()
        rep = qq.shape[1] // nkv
        kk = k.double().repeat_interleave(rep, dim=1)
        vv = v.double().repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        qpos = torch.arange(ctx - n, ctx)[:, None]
        scores = scores.masked_fill(torch.arange(ctx)[None, :] > qpos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
        s += n
    return torch.cat(outs)


def paged(ks, vs, block_size, dtype, seed=0):
    """Write per-sequence K/V into a cache through kv_cache_write with shuffled blocks."""
    nkv, d = ks[0].shape[1:]
    need = [-(-k.shape[0] // block_size) for k in ks]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    kc = torch.zeros(num_blocks, block_size, nkv, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    table = torch.zeros(len(ks), max(need), dtype=torch.int32)
    for b, (k, v, nb) in enumerate(zip(ks, vs, need)):
        blocks = [perm.pop() for _ in range(nb)]
        table[b, :nb] = torch.tensor(blocks)
        pos = torch.arange(k.shape[0])
        slots = torch.tensor(blocks)[pos // block_size] * block_size + pos % block_size
        kv_cache_write(k, v, kc, vc, slots)
    return kc, vc, table


ATTN_CASES = [
    # nh, nkv, d, block_size, q_lens, ctx_lens
    (4, 2, 32, 4, [1], [1]),                      # T=1, single cached token
    (4, 2, 32, 4, [1, 1, 1], [5, 9, 1]),          # decode batch, ragged ctx across block edges
    (6, 2, 16, 8, [20], [20]),                    # prefill > _SMALL_Q: SDPA causal path
    (6, 2, 16, 8, [18], [30]),                    # chunked prefill, SDPA with bottom-right mask
    (4, 1, 32, 4, [3], [10]),                     # short chunk (explicit path), MQA nkv=1
    (8, 2, 32, 4, [17, 1, 5], [17, 12, 9]),       # mixed ragged batch: prefill + decode + chunk
    (3, 3, 16, 16, [4, 2], [4, 7]),               # nkv == nh, block bigger than any sequence
    (4, 2, 128, 5, [1, 1], [5, 6]),               # head_dim 128, odd block size, ctx == block
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,d,bs,q_lens,ctx", ATTN_CASES)
def test_gqa_attention(dtype, nh, nkv, d, bs, q_lens, ctx):
    ks = [rand(c, nkv, d, dtype=dtype) for c in ctx]
    vs = [rand(c, nkv, d, dtype=dtype) for c in ctx]
    q = rand(sum(q_lens), nh, d, dtype=dtype)
    kc, vc, table = paged(ks, vs, bs, dtype)
    qsl = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    out = gqa_attention(q, kc, vc, table, torch.tensor(ctx, dtype=torch.int32), qsl, d ** -0.5)
    assert out.shape == q.shape
    close(out, ref_attention(q, ks, vs, q_lens, d ** -0.5), dtype)


def test_kv_cache_write_slots():
    kc = torch.zeros(3, 2, 1, 2)
    vc = torch.zeros_like(kc)
    k = torch.arange(6.0).view(3, 1, 2)
    kv_cache_write(k, -k, kc, vc, torch.tensor([5, 0, 2]))   # block 2 off 1, block 0 off 0, ...
    assert torch.equal(kc[2, 1, 0], k[0, 0]) and torch.equal(kc[0, 0, 0], k[1, 0])
    assert torch.equal(kc[1, 0, 0], k[2, 0]) and torch.equal(vc[1, 0, 0], -k[2, 0])
    assert kc.abs().sum() == k.abs().sum()                   # nothing else touched


# ---- moe ------------------------------------------------------------------------------------

def ref_route(x, w, bias, k, norm_min):
    p = (x.double() @ w.double().T).softmax(-1)
    sel = p if bias is None else p + bias.double().reshape(-1)
    ids = sel.topk(k, -1).indices
    ww = p.gather(-1, ids)
    return ww / ww.sum(-1, keepdim=True).clamp(min=norm_min), ids


def ref_experts(x, w, ids, g, u, d):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            out[t] += w[t, j].double() * ref_swiglu(x[t:t + 1], g[e], u[e], d[e])[0]
    return out


def make_moe(T, H, I, E, dtype, seed=0):
    torch.manual_seed(seed)
    return dict(x=rand(T, H, dtype=dtype), router=rand(E, H, scale=H ** -0.5),
                bias=rand(1, E, scale=0.05), g=rand(E, I, H, dtype=dtype, scale=H ** -0.5),
                u=rand(E, I, H, dtype=dtype, scale=H ** -0.5),
                d=rand(E, H, I, dtype=dtype, scale=I ** -0.5))


MOE_CASES = [
    # T, H, I, E, k
    (1, 32, 16, 8, 2),     # T=1: most experts receive zero tokens
    (11, 24, 40, 7, 3),    # odd expert count, I > H
    (6, 32, 16, 3, 3),     # k == E: every expert gets every token
    (40, 16, 8, 64, 6),    # 21B-like E/k with few tokens: empty experts mid-range
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,I,E,k", MOE_CASES)
def test_moe_route_and_experts(dtype, T, H, I, E, k):
    m = make_moe(T, H, I, E, dtype)
    w, ids = moe_route(m["x"], m["router"], m["bias"], k, 1e-12)
    rw, rids = ref_route(m["x"], m["router"], m["bias"], k, 1e-12)
    assert w.dtype == dtype and ids.dtype == torch.int64
    assert torch.equal(ids, rids)
    close(w, rw, dtype)
    out = moe_experts(m["x"], w, ids, m["g"], m["u"], m["d"])
    close(out, ref_experts(m["x"], w, ids, m["g"], m["u"], m["d"]), dtype, scale=2)
    shared = (m["g"][0], m["u"][0], m["d"][0])
    full = moe(m["x"], m["router"], m["bias"], m["g"], m["u"], m["d"], k, 1e-12, shared=shared)
    close(full, out.double() + ref_swiglu(m["x"], *shared), dtype, scale=2)


def test_router_bias_selects_but_does_not_weigh():
    # H=1, x=1, so logits = log p and the softmax gives p = [0.4, 0.3, 0.2, 0.1] back.
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    router, x = p.log()[:, None], torch.ones(1, 1)
    w, ids = moe_route(x, router, None, 2, 1e-12)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3]]) / 0.7)
    w, ids = moe_route(x, router, torch.tensor([[0.0, 0.0, 0.5, 0.0]]), 2, 1e-12)
    assert ids.tolist() == [[2, 0]]                     # biased scores 0.7, 0.4 pick expert 2
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.4]]) / 0.6)   # unbiased probs
    w, _ = moe_route(x, router, None, 2, 10.0)          # norm_min clamps the denominator
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3]]) / 10.0)


def test_moe_matches_hf_sparse_block():
    """Our moe (bf16) against transformers' Ernie4_5_MoeSparseMoeBlock with the same weights."""
    from transformers import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock
    T, H, I, E, k, S = 12, 32, 16, 6, 2, 2
    cfg = Ernie4_5_MoeConfig(hidden_size=H, moe_intermediate_size=I, moe_num_experts=E, moe_k=k,
                             moe_num_shared_experts=S, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    cfg._experts_implementation = "eager"     # HF's per-expert loop, the semantics we copy
    m = make_moe(T, H, I, E, torch.bfloat16, seed=3)
    sg, su = rand(S * I, H, dtype=torch.bfloat16), rand(S * I, H, dtype=torch.bfloat16)
    sd = rand(H, S * I, dtype=torch.bfloat16, scale=0.1)
    blk = Ernie4_5_MoeSparseMoeBlock(cfg).to(torch.bfloat16)
    with torch.no_grad():
        blk.gate.weight.data = m["router"].clone()               # router stays fp32, as loaded
        blk.gate.moe_statics.e_score_correction_bias.data = m["bias"].clone()
        blk.experts.gate_up_proj.copy_(torch.cat([m["g"], m["u"]], dim=1))
        blk.experts.down_proj.copy_(m["d"])
        blk.shared_experts.gate_proj.weight.copy_(sg)
        blk.shared_experts.up_proj.weight.copy_(su)
        blk.shared_experts.down_proj.weight.copy_(sd)
        expected = blk(m["x"][None])[0]
        ours = moe(m["x"], m["router"], m["bias"], m["g"], m["u"], m["d"], k, 1e-12,
                   shared=(sg, su, sd))
    torch.testing.assert_close(ours, expected, atol=1e-2, rtol=1e-2)
    assert (ours == expected).float().mean() > 0.99   # same op order: bitwise on CPU
