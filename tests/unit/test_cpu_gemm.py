"""The prefill GEMM (backends/cpu/gemm.c, AVX2 and portable C) for every weight kind (fp32, bf16,
wint8, wint4) against the fp64 product of the reference's weights, its edge shapes (rows past a
panel or an L2 block, tiles past the last weight row, columns past a pass), and where the CPU
linear and the quantized closures use it."""

import types

import pytest
import torch

from ernie_hal.backends.cpu import kernels as cpu_kernels
from ernie_hal.backends.cpu import native
from ernie_hal.backends.cpu import prefill_gemm
from ernie_hal.backends.cpu import quant_kernels
from ernie_hal.core.quant import quantize, resolve
from ernie_hal.kernels.reference import quantized as refq
from ernie_hal.kernels.reference.dequant import dequantize

LIB, WHY = native.load()
needs_native = pytest.mark.skipif(LIB is None, reason=f"native CPU kernels unavailable: {WHY}")
KINDS = {"fp32": 0, "bf16": 1, "wint4": 4, "wint8": 8}


def _weights(kind, N, K, group, g):
    """(tensor gemm.c reads, scales or None, the fp32 values it stands for)."""
    w = torch.randn(N, K, generator=g)
    if kind == "fp32":
        return w, None, w
    if kind == "bf16":
        return w.bfloat16(), None, w.bfloat16().float()
    pw = quantize(w, resolve(kind, group), torch.float32)
    return pw.data, pw.scales, dequantize(pw.data, pw.scales, pw.bits)


def _gemm(lib, kind, x, w, scales, N, round_bf16=False, out_dtype=None):
    M, K = x.shape
    y = torch.empty(M, N, dtype=out_dtype or x.dtype)
    rc = lib.gemm(KINDS[kind], x.data_ptr(), x.dtype == torch.bfloat16, x.stride(0), w.data_ptr(),
                  None if scales is None else scales.data_ptr(), 0 if scales is None else scales.shape[-1],
                  round_bf16, y.data_ptr(), y.dtype == torch.bfloat16, N, M, N, K, torch.get_num_threads())
    assert rc == 0
    return y


def _check(lib, kind, M, N, K, group=-1, round_bf16=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, scales, values = _weights(kind, N, K, group, g)
    if round_bf16:
        values = values.bfloat16().float()
    x = torch.randn(M, K, generator=g)
    got = _gemm(lib, kind, x, w, scales, N, round_bf16)
    exact = x.double() @ values.double().t()
    # fp32 sums in order along k: within K ulps of the sum of |terms|, far below one bf16 rounding
    bound = (x.double().abs() @ values.double().abs().t()) * K * 2 ** -24
    assert ((got.double() - exact).abs() <= bound + 1e-30).all(), (kind, M, N, K)
    return got, exact


# (M, N, K): one row; a panel and a row past it; past the 128-row L2 block; tiles of 6 with 1..5
# left; K past one 512-column pass, odd K for the kinds that take it
SHAPES = [(1, 6, 64), (17, 13, 96), (130, 25, 520), (300, 7, 1030), (16, 601, 64)]


@needs_native
@pytest.mark.parametrize("kind", ["fp32", "bf16"])
@pytest.mark.parametrize("M,N,K", SHAPES + [(33, 11, 77)])
def test_native_gemm_matches_fp64_for_float_weights(kind, M, N, K):
    _check(LIB, kind, M, N, K)


@needs_native
@pytest.mark.parametrize("kind,group", [("wint8", -1), ("wint8", 32), ("wint4", 128), ("wint4", 64)])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_native_gemm_dequantizes_packed_weights_tile_by_tile(kind, group, M, N, K):
    if group > 0 and K % group:
        group = -1
    _check(LIB, kind, M, N, K, group)


@needs_native
@pytest.mark.parametrize("kind", ["wint8", "wint4"])
def test_bf16_models_multiply_the_bf16_rounded_dequantized_weights(kind):
    """round: q * s rounded to bf16 first, the values a bf16 model's reference multiplies; the
    unrounded values lie outside the bound."""
    got, _ = _check(LIB, kind, 40, 30, 256, 64, round_bf16=True)
    g = torch.Generator().manual_seed(0)
    _, _, unrounded = _weights(kind, 30, 256, 64, g)
    x = torch.randn(40, 256, generator=g)
    assert (got.double() - x.double() @ unrounded.double().t()).abs().max() > 1e-3


@needs_native
def test_bf16_activations_and_outputs_round_once():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 192, generator=g).bfloat16()
    w = torch.randn(70, 192, generator=g).bfloat16()
    got = _gemm(LIB, "bf16", x, w, None, 70)
    fp32 = _gemm(LIB, "bf16", x.float(), w, None, 70)
    assert got.dtype == torch.bfloat16 and torch.equal(got, fp32.bfloat16())
    strided = torch.randn(50, 400, generator=g).bfloat16()[:, 100:292]         # rows strided
    assert torch.equal(_gemm(LIB, "bf16", strided, w, None, 70),
                       _gemm(LIB, "bf16", strided.contiguous(), w, None, 70))


def test_portable_c_gemm_matches_fp64(monkeypatch):
    """The plain loops a machine without AVX2 builds."""
    monkeypatch.setenv("ERNIE_HAL_CPU_NATIVE", "portable")
    lib, why = native.load.__wrapped__()
    if lib is None:
        pytest.skip(f"no C compiler: {why}")
    assert lib.gemm_isa == "portable C"
    for kind in KINDS:
        _check(lib, kind, 19, 13, 160, 32 if kind.startswith("wint") else -1)


def test_the_own_gemm_is_used_where_avx2_is_the_widest_unit():
    fake = types.SimpleNamespace
    assert prefill_gemm.native_gemm_wins(fake(gemm_isa="AVX2", isa="AVX2"))
    assert not prefill_gemm.native_gemm_wins(fake(gemm_isa="AVX2", isa="AVX-512"))
    assert not prefill_gemm.native_gemm_wins(fake(gemm_isa="portable C", isa="portable C"))
    assert not prefill_gemm.native_gemm_wins(None)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_linear_runs_prefill_rows_on_the_own_gemm_when_it_wins(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(cpu_kernels.CHUNKED_GEMV_ROWS + 9, 96, generator=g).to(dtype)
    w = torch.randn(50, 96, generator=g).to(dtype)
    own = cpu_kernels.make_linear(LIB, own_gemm=True)
    assert torch.equal(own(x, w), prefill_gemm.native_gemm(LIB, x, w, 50))
    torch.testing.assert_close(own(x, w).float(), cpu_kernels.make_linear(LIB, own_gemm=False)(x, w).float(),
                               atol=2e-2, rtol=2e-2)
    assert torch.equal(own(x[:1], w), cpu_kernels.make_linear(LIB, own_gemm=False)(x[:1], w))   # decode: GEMV


@needs_native
@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_prefill_on_the_own_gemm_matches_the_reference(scheme, group, dtype):
    g = torch.Generator().manual_seed(7)
    pw = quantize(torch.randn(100, 256, generator=g), resolve(scheme, group), dtype)
    x = torch.randn(quant_kernels.CHUNKED_QGEMV_ROWS + 3, 256, generator=g).to(dtype)
    gemm = quant_kernels._gemm_native(LIB, pw.data, pw.scales, pw.bits, own_gemm=True)
    want = refq.linear(x, pw)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gemm(x), want, atol=tol, rtol=tol)
    assert torch.equal(gemm(x), prefill_gemm.native_gemm(LIB, x, pw.data, 100, kind=pw.bits, scales=pw.scales,
                                                         round_bf16=dtype == torch.bfloat16))


@needs_native
@pytest.mark.parametrize("kind,group", [("wint8", -1), ("wint8", 32), ("wint4", 128), ("wint4", 32)])
@pytest.mark.parametrize("round_bf16", [False, True])
def test_the_dequantized_tiles_are_the_references_values_bit_for_bit(kind, group, round_bf16):
    """x = I: each output is one weight value times 1, so y is the tile the kernel multiplied;
    K = 300 runs the vector loops and the scalar tail."""
    g = torch.Generator().manual_seed(11)
    K = 320 if kind == "wint4" and group == 32 else 300
    if K % max(group, 1):
        group = -1
    w, scales, values = _weights(kind, 29, K, group, g)
    got = _gemm(LIB, kind, torch.eye(K), w, scales, 29, round_bf16)
    want = values.bfloat16().float() if round_bf16 else values
    assert torch.equal(got.t(), want)
