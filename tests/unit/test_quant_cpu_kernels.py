"""The CPU backend's quantized kernels (torch's int8/int4 weight-pack GEMMs) against the reference
kernels on the same packed weights, and a quantized model on them against the reference table."""

import pytest
import torch

import ernie_hal
from ernie_hal.backends.cpu import quant_kernels as cpu
from ernie_hal.core.quant import quantize, resolve
from ernie_hal.kernels.reference import quantized as ref

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint8", 64), ("wint4", 32), ("wint4", 128),
                                          ("wint4", -1),      # per channel: scale repeated over groups of 256
                                          ("wint4", 512)])    # wider than torch's 256: repeated too
@pytest.mark.parametrize("rows", [1, 7, 64])                 # GEMV, odd batch, prefill-sized
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_reference(scheme, group, rows, dtype):
    g = torch.Generator().manual_seed(rows)
    N, K = 96, 1024
    pw = quantize(torch.randn(N, K, generator=g), resolve(scheme, group), dtype)
    x = torch.randn(rows, K, generator=g).to(dtype)
    want = ref.linear(x, pw)
    got = cpu.linear(x, cpu.prepare_weight(pw, "attn"))
    assert got.dtype == dtype and got.shape == want.shape
    assert _rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint4", 128)])
def test_moe_and_mlp_match_reference(scheme, group):
    g = torch.Generator().manual_seed(3)
    E, I, H, T = 4, 256, 256, 9
    spec = resolve(scheme, group)
    gate, up = (quantize(torch.randn(E, I, H, generator=g), spec, torch.float32) for _ in range(2))
    down = quantize(torch.randn(E, H, I, generator=g), spec, torch.float32)
    x = torch.randn(T, H, generator=g)
    router = torch.randn(E, H, generator=g)
    bias = torch.zeros(E)
    want = ref.moe(x, router, bias, gate, up, down, 2, 1e-12, shared=(gate[0], up[0], down[0]))
    pg, pu, pd = (cpu.prepare_weight(w, "expert") for w in (gate, up, down))
    got = cpu.moe(x, router, bias, pg, pu, pd, 2, 1e-12, shared=(pg[0], pu[0], pd[0]))
    assert _rel(got, want) < 2e-5


@pytest.mark.parametrize("vocab", [304, 300])   # 300: not a multiple of 16, no int4pack (dequantizes)
def test_embedding_keeps_rows_readable_and_head_gemm(vocab):
    pw = quantize(torch.randn(vocab, 256), resolve("wint4", 64), torch.float32)
    table = cpu.prepare_weight(pw, "embed")
    ids = torch.tensor([0, vocab - 1, 5])
    assert torch.equal(cpu.OPS["embedding"](ids, table), ref.embedding(ids, pw))
    h = torch.randn(2, 256)
    assert _rel(cpu.linear(h, table), ref.linear(h, pw)) < 2e-5


def dequantize_in_place(model, spec):
    """The plain model's weights replaced by their dequantized values: the oracle's weights."""
    W = model.model.weights

    def fix(t):
        t.copy_(quantize(t, spec).dequantize())
    fix(W.embed)
    if W.head is not W.embed:
        fix(W.head)
    for lw in W.layers:
        for t in (lw.q, lw.k, lw.v, lw.o, *(lw.mlp or ()), *(lw.experts or ()), *(lw.shared or ())):
            fix(t)


@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint8", 128), ("wint4", 128), ("wint4", -1)])
def test_quantized_model_on_cpu_kernels_equals_dequantized_fp32_model(tmp_path_factory, scheme, group):
    from ernie_hal.core.model.checkpoint_writer import write_random_checkpoint
    from ernie_hal.core.model.config import ModelConfig
    path = tmp_path_factory.mktemp("moe")
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                      moe_num_experts=4, moe_k=2, moe_intermediate_size=256, moe_num_shared_experts=1,
                      moe_layer_start_index=1)
    write_random_checkpoint(cfg, str(path), seed=0)
    ids = list(range(3, 40))
    fast = ernie_hal.load(str(path), device="cpu", dtype="fp32", quantization=scheme, group_size=group)
    assert fast.kernels["linear"].endswith("quant_kernels") and fast.kernels["moe"].endswith("quant_kernels")
    oracle = ernie_hal.load(str(path), device="cpu", dtype="fp32")
    dequantize_in_place(oracle, resolve(scheme, group))
    assert _rel(fast.logits(ids), oracle.logits(ids)) < 1e-4
