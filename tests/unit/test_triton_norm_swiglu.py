"""kernels/triton RMSNorm (+ fused residual add) and SwiGLU against kernels/reference, on CPU
tensors under the Triton interpreter.

Both kernels repeat HF's rounding steps, so 16-bit results are expected to match the reference
bit for bit almost everywhere (`mostly_equal`), not only within the tolerance: that is what
catches a weight multiply before the cast, or an activation that skips a rounding.
"""

import os

_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates any kernel

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ernie_hal.kernels import reference as ref  # noqa: E402
from ernie_hal.kernels.triton import _interpret  # noqa: E402
from ernie_hal.kernels.triton.norm import make_add_rms_norm, make_rms_norm  # noqa: E402
from ernie_hal.kernels.triton.swiglu import make_swiglu, make_swiglu_mlp  # noqa: E402

if _OLD_INTERPRET is None:  # leave the session's environment as found (see test_triton_moe)
    os.environ.pop("TRITON_INTERPRET")
else:
    os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    problem = _interpret.interpreter_problem()
    if problem:  # another module imported triton first: run this file alone, or set it earlier
        pytest.skip(problem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2.5e-2, 2e-2)}
DTYPES = list(TOL)
CUDA_LIKE = {"num_warps": 4}
AMD_LIKE = {"num_warps": 8, "num_stages": 1, "waves_per_eu": 2, "matrix_instr_nonkdim": 16,
            "kpack": 1}


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)
    if dtype != torch.float32:
        assert (actual == expected).double().mean() >= 0.99, "HF rounding steps not reproduced"


def rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---- RMSNorm --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,config", [
    ((1, 64), CUDA_LIKE),         # T=1 (decode)
    ((13, 96), AMD_LIKE),         # H not a power of two (masked tail), AMD launch options
    ((2, 5, 48), None),           # leading dims, default num_warps
])
def test_rms_norm(dtype, shape, config):
    H = shape[-1]
    x, w = rand(*shape, dtype=dtype, scale=3), rand(H, dtype=dtype, seed=1)
    r = rand(*shape, dtype=dtype, seed=2)
    close(make_rms_norm(config)(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype)
    normed, summed = make_add_rms_norm(config)(x, r, w, 1e-5)
    normed_ref, summed_ref = ref.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(summed, summed_ref)          # the add is rounded to x.dtype, as in HF
    close(normed, normed_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_fp32_weight_and_strided_rows(dtype):
    # An fp32 weight (torch promotes, the reference casts back) and rows that are a slice of a
    # wider buffer (row stride 2H).
    x = rand(7, 128, dtype=dtype, scale=2)[:, :64]
    w = rand(64, seed=1)
    close(make_rms_norm()(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), dtype)


def test_rms_norm_zero_rows_and_bad_config():
    x = torch.empty(0, 32)
    assert make_rms_norm()(x, torch.ones(32), 1e-5).shape == (0, 32)
    with pytest.raises(ValueError, match="num_warp"):
        make_rms_norm({"num_warp": 8})              # the interpreter would ignore the typo


# ---- SwiGLU ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,I,config", [
    (1, 48, 40, CUDA_LIKE),                       # T=1 (decode)
    (17, 64, 96, {"BLOCK_N": 32, **AMD_LIKE}),    # several column tiles, ragged tail (96 % 64)
])
def test_swiglu_mlp(dtype, T, H, I, config):
    x = rand(T, H, dtype=dtype)
    wg = rand(I, H, dtype=dtype, scale=H ** -0.5, seed=1)
    wu = rand(I, H, dtype=dtype, scale=H ** -0.5, seed=2)
    wd = rand(H, I, dtype=dtype, scale=I ** -0.5, seed=3)
    close(make_swiglu_mlp(config)(x, wg, wu, wd), ref.swiglu_mlp(x, wg, wu, wd), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_on_fused_gate_up(dtype):
    # g and u as the two halves of one [.., 2I] GEMM output (strided views), 3-D, and in place.
    gu = rand(2, 3, 2 * 40, dtype=dtype, scale=2)
    g, u = gu[..., :40], gu[..., 40:]
    expected = torch.nn.functional.silu(g) * u
    swiglu = make_swiglu({"BLOCK_N": 16})
    close(swiglu(g, u), expected, dtype)
    g2 = g.contiguous()
    assert swiglu(g2, u, out=g2) is g2
    close(g2, expected, dtype)
