"""How the GPU backends choose an implementation per op (backends/_kernel_binding.py), without
running a kernel: config files merged per device, reasons for every refusal, fallback only
when allowed, labels that leave the shared reference functions untouched."""

import dataclasses
import sys

import pytest
import torch

from ernie_hal.backends import _kernel_binding as kb
from ernie_hal.backends.cuda.devices import NVIDIA
from ernie_hal.backends.rocm.devices import AMD
from ernie_hal.core.checks import conformance as conf
from ernie_hal.core.plugins.emulate import EmulatedBackend
from ernie_hal.core.plugins.kernel_table import OPS, KernelNotAvailable, OpSpec
from ernie_hal.core.plugins.registry import Registry
from ernie_hal.kernels import reference


def fake(name, table, device, triton=False, torch_device=None):
    b = EmulatedBackend(name, kb.find_device(table, device), (torch.float32, torch.bfloat16, torch.float16))
    b.caps = dataclasses.replace(b.caps, triton=triton)
    if torch_device:
        b.info = dataclasses.replace(b.info, torch_device=torch_device)
    return b


def test_config_files_apply_default_then_arch_then_device():
    from ernie_hal.backends.cuda.kernels import BINDER
    h100 = fake("cuda", NVIDIA, "H100 SXM")
    assert BINDER.stems(h100.info)[:3] == ("default", "sm_90", "NVIDIA_H100_SXM")
    merged = BINDER.configs(h100)
    assert merged["files"][:3] == ["default.json", "sm_90.json", "NVIDIA_H100_SXM.json"]
    assert merged["ops"]["gqa_attention"]["config"]["num_stages"] == 3          # from sm_90.json
    assert merged["ops"]["swiglu_mlp"]["config"]["BLOCK_N"] == 1024             # from default.json
    l4 = BINDER.configs(fake("cuda", NVIDIA, "L4"))                             # sm_89: defaults only
    assert l4["files"] == ["default.json"]


def test_find_device_by_name_tokens_or_arch():
    assert kb.find_device(AMD, "MI355X").arch == "gfx950"
    assert kb.find_device(AMD, "gfx942").name == "AMD Instinct MI300X"
    assert kb.find_device(NVIDIA, "A100").arch == "sm_80"
    with pytest.raises(ValueError, match="choose one of"):
        kb.find_device(AMD, "MI999")


def test_without_triton_the_triton_ops_fall_back_only_when_allowed():
    reg = Registry(autoload=False)
    backend = fake("cuda", NVIDIA, "H100")                     # caps.triton False
    spec = OpSpec(torch.bfloat16, allow_fallback=False)
    with pytest.raises(KernelNotAvailable, match="Triton cannot launch kernels on cuda:0"):
        reg.kernel_table(backend, spec)
    table = reg.kernel_table(backend, OpSpec(torch.bfloat16))  # fallback allowed: the reference
    assert set(table.ops) == set(OPS)
    impls = conf.bindings(reg, backend)
    assert impls["linear"] == impls["embedding"] == "reference"      # native: vendor BLAS / gather
    assert impls["moe"].startswith("reference (fallback: cuda: triton: Triton cannot launch")


def test_reference_ops_are_labelled_on_a_copy():
    reg = Registry(autoload=False)
    backend = fake("cuda", NVIDIA, "H100")
    fn = reg.pm.hook.ernie_hal_get_kernel(backend=backend, op="linear", spec=OpSpec(torch.float16))
    assert fn.ernie_hal_impl == "reference" and "vendor BLAS" in fn.ernie_hal_reason
    assert fn is not reference.linear and fn.__code__ is reference.linear.__code__
    assert not hasattr(reference.linear, "ernie_hal_impl")    # the cpu backend's op is untouched


def test_a_missing_kernel_module_is_a_reason(monkeypatch):
    monkeypatch.setitem(kb.TRITON_OPS, "rms_norm", ("no_such_kernels", "make_rms_norm"))
    backend = fake("cuda", NVIDIA, "H100", triton=True)
    binder = kb.KernelBinder("cuda", kb.config_dir_of(sys.modules["ernie_hal.backends.cuda.kernels"].__file__),
                             NVIDIA)
    why = binder.explain(backend, "rms_norm", OpSpec(torch.float16))
    assert why == "cuda: triton: kernels/triton/no_such_kernels.py is not there"


def test_aiter_is_passed_over_with_its_reason():
    from ernie_hal.backends.rocm.kernels import BINDER
    gpu = fake("rocm", AMD, "MI300X", torch_device="cuda:0")    # looks like a ROCm device
    c = BINDER.choice(gpu, "rms_norm", torch.bfloat16)
    assert c.fn is None                                          # no aiter here, no Triton either
    assert "aiter: aiter is not importable" in c.reason and "triton: Triton cannot launch" in c.reason
    c32 = BINDER.choice(gpu, "rms_norm", torch.float32)
    assert "AITER's rms_norm takes bfloat16, float16, not float32" in c32.reason


def test_ixuca_router_stays_on_torch_with_its_reason():
    from ernie_hal.backends.ixuca.devices import ILUVATAR
    from ernie_hal.backends.ixuca.kernels import BINDER
    c = BINDER.choice(fake("ixuca", ILUVATAR, None), "moe_route", torch.float16)
    assert c.impl == "reference" and "topk_softmax" in c.reason
