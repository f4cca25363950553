"""The fused Triton MoE on packed expert weights (w8a16 / w4a16) under the interpreter, against
the reference quantized kernels (kernels/reference/quantized.py) on the same PackedWeights:
wint8 and wint4, group sizes 32 / 64 / 128 / per channel, top-k 1 / 2 / 8, experts with no token,
odd token counts, fp32 and fp16 activations, with and without shared experts.

Each dtype carries its own tolerance; each parametrized shape names the edge it covers. Tiny
shapes: the interpreter runs every program in numpy.
"""

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

from ernie_hal.kernels.triton import moe as float_moe  # noqa: E402
from ernie_hal.kernels.triton.moe_wint import block_k_for, make_moe_experts_wint, make_moe_wint  # noqa: E402

# (atol, rtol) per dtype for O(1) outputs (the reference rounds after every expert's add)
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3)}
# BLOCK_K 64: above group 32 (lowered to one group per tile), below 128 (two tiles per group),
# not dividing I = 96 (a ragged K edge in the down GEMM)
CUDA_LIKE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "num_warps": 4, "num_stages": 3}
AMD_LIKE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2,
            "waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2}
BUCKETED = {"2": {**CUDA_LIKE, "BLOCK_N": 16, "BLOCK_K": 128},     # decode bucket
            "4096": {**CUDA_LIKE, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32},
            "shared": {"gemv": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}}}
SCHEMES = [("wint8", -1), ("wint8", 32), ("wint4", 64), ("wint4", 128), ("wint4", -1)]


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def widths(group) -> tuple:
    """(H, I): I = 96 (not a power of two: ragged N and K tiles) where the group divides it."""
    return (128 if group == 128 else 64), (96 if group in (-1, 32) else 128)


def packed(g, shape, spec, dtype):
    return quantize(torch.randn(*shape, generator=g) * shape[-1] ** -0.5, spec, dtype)


def layer(T, E, scheme, group, dtype, shared, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec, (H, I) = resolve(scheme, group), widths(group)
    x = torch.randn(T, H, generator=g).to(dtype)
    router = torch.randn(E, H, generator=g) * H ** -0.5
    bias = torch.randn(E, generator=g) * 0.05
    experts = (packed(g, (E, I, H), spec, dtype), packed(g, (E, I, H), spec, dtype), packed(g, (E, H, I), spec, dtype))
    sh = None
    if shared:
        sh = (packed(g, (2 * I, H), spec, dtype), packed(g, (2 * I, H), spec, dtype), packed(g, (H, 2 * I), spec, dtype))
    return x, router, bias, experts, sh


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("T,E,k,shared", [(5, 8, 2, True),     # odd T, shared experts added in the combine
                                          (1, 8, 8, False),    # decode, k = E = 8
                                          (3, 16, 1, False)])  # k = 1: most experts get no token
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_moe_matches_reference(scheme, group, T, E, k, shared, dtype):
    x, router, bias, experts, sh = layer(T, E, scheme, group, dtype, shared, seed=T * 100 + E)
    want = ref.moe(x, router, bias, *experts, k, 1e-12, sh)
    close(make_moe_wint(CUDA_LIKE)(x, router, bias, *experts, k, 1e-12, sh), want, dtype)


@pytest.mark.parametrize("config", [AMD_LIKE,    # AMD launch extras, BLOCK_K 32
                                    BUCKETED],   # per-T buckets and the shared MLP's tiles
                         ids=["amd", "bucketed"])
@pytest.mark.parametrize("T", [1, 7])
def test_configs_give_the_same_results(config, T):
    x, router, bias, experts, sh = layer(T, 8, "wint4", 32, torch.float32, True, seed=T)
    want = ref.moe(x, router, bias, *experts, 2, 1e-12, sh)
    close(make_moe_wint(config)(x, router, bias, *experts, 2, 1e-12, sh), want, torch.float32)


@pytest.mark.parametrize("scheme,group", [("wint8", 64), ("wint4", -1)])
def test_moe_experts_with_every_token_on_one_expert(scheme, group):
    """moe_experts on a given routing: expert 5 gets all 7 tokens (one run longer than BLOCK_M
    with a padded tail), the others none."""
    x, _, _, experts, _ = layer(7, 8, scheme, group, torch.float16, False, seed=7)
    ids = torch.full((7, 1), 5, dtype=torch.int64)
    weights = torch.rand(7, 1, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    want = ref.moe_experts(x, weights, ids, *experts)
    close(make_moe_experts_wint(CUDA_LIKE)(x, weights, ids, *experts), want, torch.float16)


def test_long_prefill_runs_in_chunks_with_the_same_result(monkeypatch):
    x, router, bias, experts, sh = layer(7, 8, "wint8", -1, torch.float32, True, seed=3)
    want = ref.moe(x, router, bias, *experts, 2, 1e-12, sh)
    monkeypatch.setattr(float_moe, "CHUNK_TOKENS", 3)    # 7 tokens: chunks of 3, 3, 1
    close(make_moe_wint(CUDA_LIKE)(x, router, bias, *experts, 2, 1e-12, sh), want, torch.float32)


def test_no_tokens():
    x, router, bias, experts, sh = layer(0, 8, "wint4", 128, torch.float16, True)
    assert make_moe_wint(CUDA_LIKE)(x, router, bias, *experts, 2, 1e-12, sh).shape == (0, 128)


def test_block_k_stays_within_one_group():
    assert block_k_for(64, 32, 256) == 32          # lowered to the group
    assert block_k_for(64, 128, 256) == 64         # two tiles per group
    assert block_k_for(64, 96, 96) == 64           # per channel: any tile, ragged edge masked
    with pytest.raises(ValueError, match="group size 48"):
        block_k_for(64, 48, 96)
