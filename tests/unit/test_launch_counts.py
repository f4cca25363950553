"""core/checks/launches.py: kernel launches per decoder layer, counted on the cpu (aten ops that do
work) and through the Triton wrappers under the interpreter (the cuda binding, emulated)."""

import pytest
import torch

import ernie_hal
from ernie_hal.core.checks.launches import count_launches, decode_step_launches


def test_counts_work_ops_not_views():
    x = torch.randn(4, 8)
    with count_launches() as c:
        y = x.view(8, 4).t()          # views: no launch
        torch.empty(3)                # no launch
        z = y @ y.t() + 1             # a GEMM and an add
    assert c.launches("embed") == 2 and z.shape == (4, 4)


def test_reference_decode_step_per_layer_counts_are_stable():
    model = ernie_hal.load("tiny-moe", device="cpu", dtype="fp32")
    a = decode_step_launches(model, batch=2)
    b = decode_step_launches(model, batch=2)
    assert a["per_layer"] == b["per_layer"] and a["per_layer"]["moe"] > a["per_layer"]["dense"] > 0
    assert a["step_total"] == a["decoder_layers_total"] + a["embed"] + a["head_and_sampling"]


def test_triton_moe_layer_is_one_router_launch_and_no_router_gemm():
    """The emulated cuda binding: the MoE layer launches the router kernel once with the router
    GEMM fused into it, so it runs as many GEMMs as a dense layer (attention projections and the
    shared expert's, as fused at load), and no host sync."""
    from ernie_hal.core.plugins.emulate import emulate, interpreter_problem
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    model = ernie_hal.load("tiny-moe", device=emulate("cuda", "H100"), dtype="fp32")
    r = decode_step_launches(model, batch=1)
    moe, dense = r["per_layer_ops"]["moe"], r["per_layer_ops"]["dense"]
    assert moe["triton.moe_router_kernel"] == 1 and moe["aten.linear"] == dense["aten.linear"]
    assert r["per_layer"] == {"dense": 10, "moe": 15} and r["host_syncs"] == 0


def test_quantized_layers_launch_only_triton_kernels():
    """The emulated cuda binding of a wint4 model: every launch of a decoder layer is a Triton
    kernel (no torch op dequantizing a weight), the packed experts one gate+up and one down launch,
    the lookup one kernel, and no host sync."""
    from ernie_hal.core.plugins.emulate import emulate, interpreter_problem
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    model = ernie_hal.load("tiny-moe", device=emulate("cuda", "H100"), dtype="fp32", quantization="wint4",
                           group_size=32, allow_fallback=False)
    r = decode_step_launches(model, batch=1)
    for ops in r["per_layer_ops"].values():
        assert all(k.startswith("triton.") for k in ops), ops
    moe = r["per_layer_ops"]["moe"]
    assert moe["triton.moe_gate_up_wint_kernel"] == moe["triton.moe_down_wint_kernel"] == 1
    assert r["kernels"]["embed"]["triton.embedding_wint_kernel"] == 1 and r["host_syncs"] == 0
