"""A weight-only quantized model on the cuda, rocm and ixuca backends (faked device properties,
as tests/unit/test_gpu_probing.py fakes them) binds the packed Triton kernels for every op that
takes packed weights (embedding, linear, swiglu_mlp, moe_experts, moe) instead of the reference,
with each backend's own configs, and the binding report (`devices --json`) says so."""

from types import SimpleNamespace

import pytest
import torch

from ernie_hal.backends.cuda import backend as cuda_backend
from ernie_hal.backends.cuda.kernels import BINDER as CUDA
from ernie_hal.backends.ixuca import backend as ix_backend
from ernie_hal.backends.rocm import backend as rocm_backend
from ernie_hal.backends.rocm.kernels import BINDER as ROCM
from ernie_hal.core.plugins.binding_report import bindings
from ernie_hal.core.plugins.kernel_table import OpSpec
from ernie_hal.core.plugins.registry import Registry
from ernie_hal.kernels.triton.moe import pick_config
from ernie_hal.kernels.triton.moe_wint import gate_up_shared_memory

from .test_gpu_probing import GiB, KiB, fake_torch, h100_props  # noqa: F401 - fixture
from .test_moe_configs import mi300x_props

PACKED = ("embedding", "linear", "swiglu_mlp", "moe_experts", "moe")
AMD_KEYS = {"waves_per_eu", "matrix_instr_nonkdim", "kpack"}


def bi_v150_props():
    return SimpleNamespace(name="Iluvatar BI-V150", major=7, minor=1, total_memory=32 * GiB,
                           shared_memory_per_block=64 * KiB)


def make(fake_torch, name):
    if name == "cuda":
        fake_torch("2.6.0+cu124", h100_props(), cuda="12.4")
        return cuda_backend.make_backend(0)
    if name == "rocm":
        fake_torch("2.6.0+rocm6.2", mi300x_props(), hip="6.2.41133")
        return rocm_backend.make_backend(0)
    fake_torch("2.7.1+corex.4.4.0", bi_v150_props(), cuda="10.2", triton="3.1.0+corex.4.4.0")
    return ix_backend.make_backend(0)


def quant_spec(scheme, group, dtype=torch.float16):
    return OpSpec(dtype, facts=(("group_size", group), ("quantization", scheme)), allow_fallback=False)


@pytest.mark.parametrize("name", ["cuda", "rocm", "ixuca"])
@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint4", 128)])
def test_quantized_model_binds_the_packed_triton_kernels(fake_torch, name, scheme, group):
    backend = make(fake_torch, name)
    assert backend.caps.triton
    table = Registry(autoload=False).kernel_table(backend, quant_spec(scheme, group))  # no fallback allowed
    want = {op: "triton" for op in PACKED}
    if name == "ixuca":       # the router stays on torch there; the packed experts and shared MLP are Triton
        want["moe"] = "triton+reference"
        assert table.moe.ernie_hal_parts == {"moe_route": "reference", "moe_experts": "triton",
                                             "swiglu_mlp": "triton"}
    else:                     # the fused packed MoE itself, not the float one
        assert table.moe.__module__.endswith("kernels.triton.moe_wint")
    assert {op: table.sources[op] for op in PACKED} == want


@pytest.mark.parametrize("name", ["cuda", "rocm", "ixuca"])
def test_binding_report_lists_the_packed_ops(fake_torch, name):
    report = bindings(Registry(autoload=False), make(fake_torch, name), torch.float32, "wint4")
    assert set(report) == set(PACKED)
    assert all(impl.startswith("triton") for impl in report.values()), report


def test_each_backend_gets_its_own_packed_moe_tiles(fake_torch):
    reg = Registry(autoload=False)
    cfg = {}
    for name in ("cuda", "rocm"):
        b = make(fake_torch, name)
        cfg[name] = reg.pm.hook.ernie_hal_get_kernel(backend=b, op="moe", spec=quant_spec("wint8", -1)).ernie_hal_config
    h100, mi300 = cfg["cuda"], cfg["rocm"]
    assert "shared" not in h100 and not any(AMD_KEYS & set(v) for v in h100.values())
    tiles = {k: v for k, v in mi300.items() if k != "shared"}
    assert all(AMD_KEYS <= set(v) and v["num_stages"] <= 2 for v in tiles.values())
    assert mi300["shared"]["gemm"]["num_stages"] <= 2               # the shared experts' linear, AMD stages
    assert pick_config(tiles, 1)["BLOCK_N"] == 16                   # gfx942's decode bucket (304 CUs)
    assert pick_config(h100, 1)["BLOCK_K"] == 128                   # sm_90's decode bucket


def test_packed_moe_tiles_fit_shared_memory(fake_torch):
    """Every shipped bucket on H100 (all of them) and MI300X (decode, as for the float MoE)."""
    b = make(fake_torch, "cuda")
    for scheme in ("wint8", "wint4"):
        buckets = CUDA.configs(b)["ops"][f"moe.{scheme}"]["config"]
        for max_t in buckets:
            assert gate_up_shared_memory(pick_config(buckets, int(max_t))) <= b.caps.max_shared_memory, max_t
    b = make(fake_torch, "rocm")
    for scheme in ("wint8", "wint4"):
        buckets = {k: v for k, v in ROCM.configs(b)["ops"][f"moe.{scheme}"]["config"].items() if k != "shared"}
        for T in (1, 8):
            assert gate_up_shared_memory(pick_config(buckets, T)) <= b.caps.max_shared_memory, T
