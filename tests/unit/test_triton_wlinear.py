"""The weight-only quantized Triton linear (w8a16 / w4a16) under the interpreter against the
reference kernel on the same packed weights, GEMV- and GEMM-shaped, fp32 and fp16 activations."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from ernie_hal.core.quant import quantize, resolve  # noqa: E402
from ernie_hal.kernels.reference import quantized as ref  # noqa: E402
from ernie_hal.kernels.triton._interpret import interpreter_problem  # noqa: E402

if interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)

from ernie_hal.kernels.triton.wlinear import make_linear_wint  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
SMALL = {"gemv": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, "gemm": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}}


@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint8", 32), ("wint4", 32), ("wint4", 128), ("wint4", -1)])
@pytest.mark.parametrize("rows", [1,     # GEMV tiles, one row of 16
                                  40])   # GEMM tiles, rows not a multiple of BLOCK_M
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(scheme, group, rows, dtype):
    g = torch.Generator().manual_seed(rows)
    N, K = 72, 256           # N not a multiple of BLOCK_N
    pw = quantize(torch.randn(N, K, generator=g), resolve(scheme, group), dtype)
    x = torch.randn(rows, K, generator=g).to(dtype)
    want = ref.linear(x, pw)
    got = make_linear_wint(SMALL)(x, pw)
    assert got.dtype == dtype and got.shape == want.shape
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < TOL[dtype]


@pytest.mark.parametrize("scheme,group", [("wint8", None), ("wint4", 32)])
def test_quantized_model_on_an_emulated_gpu_binds_the_triton_kernels(scheme, group):
    """The whole tiny MoE model, quantized, on the cuda backend's kernels (Triton under the
    interpreter, no fallback: packed linear, embedding, shared-expert MLP and fused MoE) equals the
    cpu run."""
    import ernie_hal
    from ernie_hal.backends.cuda.plugin import emulated_backend
    ids = [3, 17, 101, 5, 250, 9]
    gpu = ernie_hal.load("tiny-moe", device=emulated_backend(), dtype="fp32", quantization=scheme,
                         group_size=group, allow_fallback=False)
    assert all(gpu.kernels[op] == "triton" for op in ("linear", "embedding", "swiglu_mlp", "moe")), gpu.kernels
    cpu = ernie_hal.load("tiny-moe", device="cpu", dtype="fp32", quantization=scheme, group_size=group)
    a, b = gpu.logits(ids), cpu.logits(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
