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


@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint4", 64), ("wint4", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_embedding_rows_equal_the_reference_lookup(scheme, group, dtype):
    """A decode step's ids dequantized natively (qgemv.c, row by row) give the reference's rows bit
    for bit; a prefill-sized lookup takes the reference path."""
    pw = quantize(torch.randn(300, 256), resolve(scheme, group), dtype)
    table = cpu.prepare_weight(pw, "embed")
    for ids in (torch.tensor([7]), torch.tensor([0, 299, 7, 7]), torch.arange(cpu.NATIVE_EMBEDDING_ROWS + 5)):
        got = cpu.OPS["embedding"](ids, table)
        assert got.dtype == dtype and torch.equal(got, ref.embedding(ids, pw))


# ---- the native kernels (qgemv.c) -----------------------------------------------------------------
from ernie_hal.backends.cpu import native  # noqa: E402

LIB, WHY = native.load()
needs_native = pytest.mark.skipif(LIB is None, reason=f"native CPU kernels unavailable: {WHY}")
# (group, in_features): each group size, with widths that are not whole 128-column lines
SHAPES = [(32, 96), (32, 1024), (64, 320), (128, 384), (-1, 200), (-1, 1024),
          (64, 192),      # groups of 64 ending mid 128-column line
          (128, 640),     # several 128-column groups, an odd count of 64-column blocks
          (-1, 8)]        # one row shorter than any vector


def _close_to_exact(got, x, pw, dtype):
    """No further from the exact fp64 product than the reference op is (or fp32 rounding)."""
    exact = x.double() @ pw.dequantize(torch.float64).t()
    ours = (got.double() - exact).abs().max().item()
    theirs = (ref.linear(x, pw).double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert ours <= max(theirs * 1.5, scale * (2 ** -8 if dtype == torch.bfloat16 else 2e-6)), (ours, theirs)


def _check_native_linear(lib, scheme, group, K, rows, dtype, N=37):
    g = torch.Generator().manual_seed(rows * K + N)
    pw = quantize(torch.randn(N, K, generator=g), resolve(scheme, group), dtype)
    x = torch.randn(rows, K, generator=g).to(dtype)
    gemm = cpu._gemm_native(lib, pw.data, pw.scales, pw.bits)
    got = gemm(x)
    assert got.dtype == dtype and got.shape == (rows, N)
    assert _rel(got, ref.linear(x, pw)) < TOL[dtype]
    _close_to_exact(got, x, pw, dtype)
    return gemm, pw, x


@needs_native
@pytest.mark.parametrize("scheme", ["wint8", "wint4"])
@pytest.mark.parametrize("group,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_gemv_matches_reference(scheme, group, K, dtype):
    """Every decode batch size 1..8 against the reference, odd row counts (37), each group size."""
    for rows in range(1, cpu.QGEMV_MAX_ROWS + 1):
        _check_native_linear(LIB, scheme, group, K, rows, dtype)


@needs_native
@pytest.mark.parametrize("K", [1, 7, 31, 33, 100])       # wint8 tails shorter than a vector
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_wint8_per_channel_odd_widths(K, dtype):
    for rows in (1, 2, 5, 8):
        _check_native_linear(LIB, "wint8", -1, K, rows, dtype, N=19)


@pytest.mark.parametrize("scheme", ["wint8", "wint4"])
def test_portable_c_kernels_match_reference(monkeypatch, scheme):
    """The loops a machine without AVX2 or AVX-512 runs (built without -march=native)."""
    monkeypatch.setenv("ERNIE_HAL_CPU_NATIVE", "portable")
    lib, why = native.load.__wrapped__()
    if lib is None:
        pytest.skip(f"no C compiler: {why}")
    assert lib.qisa == "portable C"
    for group, K in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (1, 3, 8):
                _check_native_linear(lib, scheme, group, K, rows, dtype, N=21)


@needs_native
@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint8", 64), ("wint4", 128), ("wint4", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_prefill_equals_reference(monkeypatch, scheme, group, dtype):
    """Prefill rows off the own GEMM (test_cpu_gemm.py covers it): the reference's dequantized
    values (bit for bit) through torch's GEMM, one chunk or several."""
    g = torch.Generator().manual_seed(1)
    pw = quantize(torch.randn(100, 256, generator=g), resolve(scheme, group), dtype)
    x = torch.randn(cpu.CHUNKED_QGEMV_ROWS + 3, 256, generator=g).to(dtype)
    assert torch.equal(cpu._gemm_native(LIB, pw.data, pw.scales, pw.bits, own_gemm=False)(x), ref.linear(x, pw))
    monkeypatch.setattr(cpu, "PREFILL_CHUNK_BYTES", 32 * 4 * 256)       # 32 rows per chunk
    got = cpu._gemm_native(LIB, pw.data, pw.scales, pw.bits, own_gemm=False)(x)
    torch.testing.assert_close(got, ref.linear(x, pw), rtol=TOL[dtype], atol=TOL[dtype])


@needs_native
def test_native_kernels_take_strided_and_batched_activations():
    pw = quantize(torch.randn(40, 128), resolve("wint4", 64), torch.bfloat16)
    gemm = cpu.prepare_weight(pw, "attn").native
    big = torch.randn(3, 200).to(torch.bfloat16)
    x = big[:, 8:136]                                      # rows strided, columns contiguous
    assert _rel(gemm(x), ref.linear(x, pw)) < TOL[torch.bfloat16]
    x3 = torch.randn(2, 3, 128).to(torch.bfloat16)         # [B, T, in] -> [B, T, out]
    assert gemm(x3).shape == (2, 3, 40) and _rel(gemm(x3), ref.linear(x3, pw)) < TOL[torch.bfloat16]


@needs_native
@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint8", 128), ("wint4", 128), ("wint4", -1)])
def test_prepare_weight_keeps_one_copy(scheme, group):
    """The native kernels read the stored packed bytes: prepare_weight copies nothing, and the
    embedding lookup reads the same table the head GEMM does."""
    pw = quantize(torch.randn(304, 256), resolve(scheme, group), torch.bfloat16)
    for role in ("head", "embed", "mlp"):
        prepared = cpu.prepare_weight(pw, role)
        assert prepared.data.data_ptr() == pw.data.data_ptr() and prepared.scales.data_ptr() == pw.scales.data_ptr()
    stack = quantize(torch.randn(3, 64, 128), resolve(scheme, group), torch.float32)
    prepared = cpu.prepare_weight(stack, "expert")
    assert prepared.data.data_ptr() == stack.data.data_ptr() and len(prepared.native) == 3


@pytest.fixture
def torch_fallback(monkeypatch):
    """The CPU backend as a machine without a compiler sees it (ERNIE_HAL_CPU_NATIVE=0)."""
    monkeypatch.setenv("ERNIE_HAL_CPU_NATIVE", "0")
    native.load.cache_clear()
    yield
    monkeypatch.delenv("ERNIE_HAL_CPU_NATIVE")
    native.load.cache_clear()


@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint8", 64), ("wint4", 128), ("wint4", -1)])
def test_torch_fallback_matches_reference(torch_fallback, scheme, group):
    assert native.load()[0] is None
    pw = quantize(torch.randn(48, 512), resolve(scheme, group), torch.bfloat16)
    prepared = cpu.prepare_weight(pw, "attn")
    for rows in (1, 5, 12):
        x = torch.randn(rows, 512).to(torch.bfloat16)
        assert _rel(cpu.linear(x, prepared), ref.linear(x, pw)) < TOL[torch.bfloat16]


def _greedy(model, prompts):
    return [c.token_ids for c in model.generate(prompts, max_new_tokens=12, temperature=0, ignore_eos=True)]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint8", 32), ("wint4", 32), ("wint4", -1)])
def test_quantized_greedy_decode_equals_the_dequantized_model(preset, scheme, group):
    """Greedy tokens (prefill, then decode through the GEMV) of a quantized fp32 model on the CPU
    kernels equal those of the fp32 model holding the dequantized weights."""
    prompts = [[5, 9, 200, 17], list(range(30, 52))]
    fast = ernie_hal.load(preset, device="cpu", dtype="fp32", quantization=scheme, group_size=group)
    oracle = ernie_hal.load(preset, device="cpu", dtype="fp32")
    dequantize_in_place(oracle, resolve(scheme, group))
    assert _greedy(fast, prompts) == _greedy(oracle, prompts)
