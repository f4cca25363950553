"""The packed SwiGLU MLP (three packed linears + the SwiGLU kernel) and the packed embedding
lookup (only the rows read are dequantized) under the interpreter, against the reference
quantized kernels on the same PackedWeights; fp32 and fp16 activations."""

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

from ernie_hal.kernels.triton.embedding_wint import make_embedding_wint  # noqa: E402
from ernie_hal.kernels.triton.swiglu_wint import make_swiglu_mlp_wint  # noqa: E402

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3)}
SMALL = {"gemv": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, "gemm": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32},
         "swiglu": {"BLOCK_N": 64}}
SCHEMES = [("wint8", -1), ("wint8", 32), ("wint4", 64), ("wint4", 128), ("wint4", -1)]


def packed(g, shape, scheme, group, dtype):
    return quantize(torch.randn(*shape, generator=g) * shape[-1] ** -0.5, resolve(scheme, group), dtype)


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("rows", [1,     # decode: GEMV tiles
                                  40])   # prefill: GEMM tiles, rows not a multiple of BLOCK_M
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_swiglu_mlp_matches_reference(scheme, group, rows, dtype):
    g = torch.Generator().manual_seed(rows)
    H, I = 128, 192 if group != 128 else 256      # I not a power of two where the group allows
    w = (packed(g, (I, H), scheme, group, dtype), packed(g, (I, H), scheme, group, dtype),
         packed(g, (H, I), scheme, group, dtype))
    x = torch.randn(rows, H, generator=g).to(dtype)
    want = ref.swiglu_mlp(x, *w)
    got = make_swiglu_mlp_wint(SMALL)(x, *w)
    atol, rtol = TOL[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_embedding_equals_reference_exactly(scheme, group, dtype):
    """One rounding of q * s: bit-identical to the reference. H = 384 with BLOCK_H 256: a ragged
    column tile; ids repeat and include the first and last rows."""
    g = torch.Generator().manual_seed(0)
    V, H = 50, 384
    table = packed(g, (V, H), scheme, group, dtype)
    ids = torch.tensor([3, 49, 0, 3, 17, 49, 8])
    got = make_embedding_wint({"BLOCK_H": 256})(ids, table)
    assert got.dtype == dtype and torch.equal(got, ref.embedding(ids, table))
    assert torch.equal(make_embedding_wint()(ids.view(7, 1), table), got.view(7, 1, H))   # any ids shape


def test_packed_embedding_of_no_tokens():
    table = packed(torch.Generator().manual_seed(0), (10, 64), "wint4", 32, torch.float16)
    assert make_embedding_wint()(torch.zeros(0, dtype=torch.long), table).shape == (0, 64)
