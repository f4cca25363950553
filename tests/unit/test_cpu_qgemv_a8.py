"""Quantized decode on int8 activations (opt-in): the native kernel (backends/cpu/qgemv_a8.c, AVX2
and portable C) against its oracle kernels/reference/int8_activations.py, the oracle's error
against the exact weight-only product, and load(..., int8_activations=True) end to end."""

import subprocess
import sys

import pytest
import torch

import ernie_hal
from ernie_hal.backends.cpu import native
from ernie_hal.backends.cpu import quant_kernels as cpu
from ernie_hal.core.quant import QuantError, quantize, resolve
from ernie_hal.kernels.reference import int8_activations as a8
from ernie_hal.kernels.reference import quantized as ref

LIB, WHY = native.load()
needs_native = pytest.mark.skipif(LIB is None, reason=f"native CPU kernels unavailable: {WHY}")
# (scheme, group, K): per channel, groups of 32 (two per 64 wint4 columns), 64, 128; K not a power of two
CASES = [("wint8", -1, 1024), ("wint8", 32, 96), ("wint8", 64, 320), ("wint8", -1, 3072),
         ("wint4", 128, 1024), ("wint4", 32, 192), ("wint4", 64, 320), ("wint4", -1, 640), ("wint4", 128, 384)]


def _packed(scheme, group, K, N=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(N, K, generator=g), resolve(scheme, group), torch.float32), g


def _kernel(lib, pw, x):
    """lib.qgemv_a8 on x [M <= 8, K] -> [M, N] in x.dtype."""
    M, K = x.shape
    N, G = pw.scales.shape
    y = torch.empty(M, N, dtype=x.dtype)
    rc = lib.qgemv_a8(pw.bits, x.data_ptr(), x.dtype == torch.bfloat16, x.stride(0), pw.data.data_ptr(),
                      pw.scales.data_ptr(), G, y.data_ptr(), N, M, N, K, torch.get_num_threads())
    assert rc == 0
    return y


def _check_kernel(lib, scheme, group, K, dtype):
    for rows in range(1, 9):
        pw, g = _packed(scheme, group, K, seed=rows)
        x = torch.randn(rows, K, generator=g).to(dtype)
        got = _kernel(lib, pw, x).float()
        want = a8.linear(x.float(), pw)          # the oracle in fp32; block sums exact, only their sum's order differs
        if dtype == torch.bfloat16:              # the kernel rounds its fp32 sum to bf16 once
            want = want.to(torch.bfloat16).float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < (1e-6 if dtype == torch.float32 else 2 ** -8), (scheme, group, K, rows, err)


@needs_native
@pytest.mark.parametrize("scheme,group,K", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_a8_kernel_matches_its_reference(scheme, group, K, dtype):
    """Every decode batch size 1..8, 37 rows (not a multiple of the 16-row blocks)."""
    assert LIB.qgemv_a8_supported(resolve(scheme, group).bits, K, K // group if group > 0 else 1)
    _check_kernel(LIB, scheme, group, K, dtype)


@needs_native
@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint4", 128), ("wint4", 32)])
@pytest.mark.parametrize("rows", [1, 3])
def test_native_a8_kernel_quantizes_ties_and_zero_blocks_as_the_reference(scheme, group, rows):
    """Blocks whose x / d land exactly on .5 (d = 1: 127 leads the block) round half to even, an
    all-zero block gets d = 0, in the kernel's vector quantization as in the oracle's: one code off
    by one would move an output by ~1e-3 of its size."""
    K = 256
    pw, g = _packed(scheme, group, K, seed=7)
    x = torch.randn(rows, K, generator=g)
    x[:, 0:32] = torch.tensor([127.0] + [i + 0.5 for i in range(15)] + [-i - 0.5 for i in range(16)])
    x[:, 64:96] = 0.0
    x[:, 160:192] = torch.tensor([-127.0, 126.5, -126.5, 2.5] * 8)
    for dtype in (torch.float32, torch.bfloat16):          # every value above is exact in bf16
        xd = x.to(dtype)
        got, want = _kernel(LIB, pw, xd).float(), a8.linear(xd.float(), pw)
        if dtype == torch.bfloat16:
            want = want.to(torch.bfloat16).float()
        assert ((got - want).abs().max() / want.abs().max()).item() < (1e-6 if dtype == torch.float32 else 2 ** -8)


def test_portable_c_a8_kernel_matches_its_reference(monkeypatch):
    """The integer loops a machine without AVX2 runs (built without -march=native)."""
    monkeypatch.setenv("ERNIE_HAL_CPU_NATIVE", "portable")
    lib, why = native.load.__wrapped__()
    if lib is None:
        pytest.skip(f"no C compiler: {why}")
    assert lib.a8isa == "portable C"
    for scheme, group, K in CASES:
        _check_kernel(lib, scheme, group, K, torch.float32)


def test_activation_quantization_is_blockwise_int8_rounded_half_to_even():
    x = torch.zeros(2, 64)
    x[0, :32] = torch.linspace(-2, 1, 32)       # block 0: amax 2 -> d = 2 / 127
    x[0, 0] = -2.0
    x[1, 40] = 0.5 * (1.0 / 127)                # block 3: d = 0.5 / 127^2 ... one value, maps to 127
    q, d = a8.quantize_activations(x)
    assert torch.equal(q, q.round()) and q.abs().max() <= 127
    assert q[0, 0] == -127 and d[0, 0] == pytest.approx(2 / 127)
    assert d[0, 1] == 0 and torch.equal(q[0, 32:], torch.zeros(32))   # an all-zero block: d = 0, q = 0
    assert q[1, 40] == 127
    half = torch.tensor([[127.0, 0.5, 1.5, 2.5] + [0.0] * 28])          # d = 1: x / d lands on halves
    assert a8.quantize_activations(half)[0][0, 1:4].tolist() == [0.0, 2.0, 2.0]


@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint4", 128)])
def test_int8_activation_error_against_the_exact_product(scheme, group):
    """What the opt-in costs: ~5e-3 relative (Frobenius) error of a projection's output on Gaussian
    activations, against the exact weight-only product."""
    pw, g = _packed(scheme, group, 1024, N=256)
    x = torch.randn(16, 1024, generator=g)
    exact = ref.linear(x, pw)
    rel = ((a8.linear(x, pw) - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 1e-2


@needs_native
def test_unsupported_shapes_keep_the_exact_kernel():
    """wint4 needs whole 64-column blocks: K = 96 decodes exactly, as without the option."""
    pw, g = _packed("wint4", 32, 96)
    assert not LIB.qgemv_a8_supported(4, 96, 3)
    x = torch.randn(2, 96, generator=g)
    got = cpu._gemm_native(LIB, pw.data, pw.scales, 4, int8_activations=True)(x)
    assert torch.equal(got, cpu._gemm_native(LIB, pw.data, pw.scales, 4)(x))


@needs_native
def test_prefill_rows_stay_exact_and_decode_rows_use_int8_activations():
    pw, g = _packed("wint4", 128, 1024, N=64)
    gemm = cpu._gemm_native(LIB, pw.data, pw.scales, 4, int8_activations=True)
    prefill = torch.randn(40, 1024, generator=g)                  # > CHUNKED_QGEMV_ROWS: dequantize + GEMM
    assert ((gemm(prefill) - ref.linear(prefill, pw)).abs().max() / ref.linear(prefill, pw).abs().max()) < 2e-5
    decode = torch.randn(12, 1024, generator=g)                   # two passes of the A8 kernel (8 + 4 rows)
    want = a8.linear(decode, pw)
    assert ((gemm(decode) - want).abs().max() / want.abs().max()) < 1e-5


@needs_native
@pytest.mark.parametrize("scheme", ["wint8", "wint4"])
def test_model_with_int8_activations_decodes_close_to_exact(scheme):
    """End to end on the tiny preset: the option is bound (and described), decode logits stay within
    the activations' rounding of the exact quantized model, and prefill logits are unchanged."""
    q = dict(quantization=scheme, group_size=32 if scheme == "wint4" else -1)     # tiny: hidden 64
    exact = ernie_hal.load("tiny", device="cpu", dtype="fp32", **q)
    fast = ernie_hal.load("tiny", device="cpu", dtype="fp32", int8_activations=True, **q)
    assert "int8 activations" in fast.describe() and "int8 activations" not in exact.describe()
    ids = list(range(3, 40))
    assert torch.equal(fast.logits(ids), exact.logits(ids))          # 37 prompt rows: the exact prefill
    a, b = fast.logits([7]), exact.logits([7])                       # one row: the decode kernels
    assert not torch.equal(a, b)
    assert ((a - b).norm() / b.norm()).item() < 3e-2
    out = fast.generate([5, 9, 200], max_new_tokens=6, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 6


def test_int8_activations_need_quantized_weights():
    with pytest.raises(QuantError, match="quantized weights only"):
        ernie_hal.load("tiny", device="cpu", dtype="fp32", int8_activations=True)


def test_cli_int8_activations_without_quantization_exits_2():
    run = subprocess.run([sys.executable, "-m", "ernie_hal", "generate", "--model", "tiny", "--device", "cpu",
                          "hi", "--max-new-tokens", "1", "--int8-activations"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "quantized weights only" in run.stderr and "Traceback" not in run.stderr
