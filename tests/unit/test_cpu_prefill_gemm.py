"""bf16 prefill GEMMs widened to fp32 on CPUs without bf16 arithmetic (backends/cpu/prefill_gemm.py):
the values torch's bf16 GEMM gives up to fp32 summation order, in chunks, and the CPU flag check."""

import pytest
import torch
import torch.nn.functional as F

from ernie_hal.backends.cpu import kernels as cpu_kernels
from ernie_hal.backends.cpu import prefill_gemm
from ernie_hal.backends.cpu.native import load as load_native

NATIVE, WHY = load_native()


def _exact(x, w):
    return (x.double() @ w.double().t())


@pytest.mark.parametrize("rows,k,n", [(9, 64, 40), (128, 1024, 300), (33, 100, 77)])
def test_widened_linear_is_the_bf16_gemm_up_to_summation_order(rows, k, n, monkeypatch):
    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(prefill_gemm, "CHUNK_BYTES", 16 * 4 * k)     # 16 rows a chunk: the loop runs
    got = prefill_gemm.linear_fp32(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # rounded once from an fp32 sum: within one bf16 ulp of the exact product, as torch's bf16 GEMM
    exact = _exact(x, w)
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6 * k).all()
    torch.testing.assert_close(got.float(), F.linear(x, w).float(), atol=2e-2, rtol=2e-2)


def test_widened_linear_keeps_leading_dims():
    x = torch.randn(2, 12, 32).to(torch.bfloat16)
    w = torch.randn(24, 32).to(torch.bfloat16)
    assert prefill_gemm.linear_fp32(x, w).shape == (2, 12, 24)


@pytest.mark.parametrize("flags,native", [("fpu sse avx2 fma", False), ("avx2 avx512f avx512_bf16", True),
                                          ("avx2 amx_bf16 amx_tile", True)])
def test_bf16_arithmetic_is_read_from_the_cpu_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert prefill_gemm.bf16_gemm_is_native.__wrapped__(str(info)) is native
    arm = tmp_path / "arm"
    arm.write_text("Features\t: fp asimd bf16 sve\n")
    assert prefill_gemm.bf16_gemm_is_native.__wrapped__(str(arm)) is True
    assert prefill_gemm.bf16_gemm_is_native.__wrapped__(str(tmp_path / "missing")) is True


@pytest.mark.skipif(NATIVE is None, reason=f"native GEMV unavailable: {WHY}")
def test_the_cpu_linear_widens_prefill_only_when_asked():
    x = torch.randn(cpu_kernels.CHUNKED_GEMV_ROWS + 8, 64).to(torch.bfloat16)      # prefill-sized
    w = torch.randn(48, 64).to(torch.bfloat16)
    widened = cpu_kernels.make_linear(NATIVE, widen_bf16=True, own_gemm=False)(x, w)
    assert torch.equal(widened, prefill_gemm.linear_fp32(x, w))
    assert torch.equal(cpu_kernels.make_linear(NATIVE, widen_bf16=False, own_gemm=False)(x, w), F.linear(x, w))
    # decode rows stay on the native GEMV either way
    one = x[:1]
    assert torch.equal(cpu_kernels.make_linear(NATIVE, widen_bf16=True)(one, w),
                       cpu_kernels.make_linear(NATIVE, widen_bf16=False)(one, w))


@pytest.mark.skipif(NATIVE is None, reason=f"native GEMV unavailable: {WHY}")
@pytest.mark.parametrize("rows", [9, 16, 20, 32])
def test_decode_batches_past_eight_rows_run_the_gemv_in_passes(rows):
    """Without bf16 arithmetic and off the own GEMM (which takes 12 rows on where it wins:
    test_cpu_gemm.py) a 9..32-row bf16 batch runs the native GEMV 8 rows a pass: the values each
    8-row batch gets alone."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(40, 64, generator=g).to(torch.bfloat16)
    linear = cpu_kernels.make_linear(NATIVE, widen_bf16=True, own_gemm=False)
    got = linear(x, w)
    assert torch.equal(got, torch.cat([linear(x[m:m + 8], w) for m in range(0, rows, 8)]))
    torch.testing.assert_close(got.float(), F.linear(x, w).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(NATIVE is None, reason=f"native GEMV unavailable: {WHY}")
@pytest.mark.parametrize("bits", [8, 4])
def test_packed_decode_batches_past_eight_rows_read_the_packed_bytes(bits):
    from ernie_hal.backends.cpu import quant_kernels
    from ernie_hal.core.quant import resolve
    from ernie_hal.core.quant.quantize import quantize
    from ernie_hal.kernels.reference import quantized as refq
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 128, generator=g)
    spec = resolve("wint8" if bits == 8 else "wint4", None)
    packed = quant_kernels.prepare_weight(quantize(w, spec, torch.float32))
    x = torch.randn(20, 128, generator=g)
    got = quant_kernels.linear(x, packed)
    # passes of 8, 8 and 4 rows: what each of those batches gives alone
    assert torch.equal(got, torch.cat([quant_kernels.linear(x[m:m + 8], packed) for m in (0, 8, 16)]))
    torch.testing.assert_close(got, refq.linear(x, packed), atol=1e-4, rtol=1e-4)
