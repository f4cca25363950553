"""What each GPU backend binds, with which configs, on every device of its table (emulated, so
the Triton wrappers validate the configs as they would on the device), and the conformance CLI.
"""

import json
import os

import pytest
import torch

from ernie_hal.backends.cuda.devices import NVIDIA
from ernie_hal.backends.ixuca.devices import ILUVATAR
from ernie_hal.backends.rocm.devices import AMD
from ernie_hal.core.checks import conformance as conf
from ernie_hal.core.plugins.backend import BackendSpec, Capabilities, DeviceInfo, ProbeResult, Backend
from ernie_hal.core.plugins.emulate import emulate, interpreter_problem
from ernie_hal.core.plugins.hookspecs import hookimpl
from ernie_hal.core.plugins.kernel_table import OPS, OpSpec
from ernie_hal.core.plugins.registry import Registry, get_registry

REG = get_registry()
INTERPRETER = interpreter_problem()
needs_interpreter = pytest.mark.skipif(bool(INTERPRETER), reason=f"needs the Triton interpreter: {INTERPRETER}")
TABLES = {"cuda": NVIDIA, "rocm": AMD, "ixuca": ILUVATAR}
AMD_KEYS = {"waves_per_eu", "matrix_instr_nonkdim", "kpack"}


def bound(backend, dtype=torch.float32):
    return {op: REG.pm.hook.ernie_hal_get_kernel(backend=backend, op=op,
                                                  spec=OpSpec(dtype=dtype, allow_fallback=False))
            for op in OPS}


@needs_interpreter
@pytest.mark.parametrize("name,device", [(n, s.name) for n, table in TABLES.items() for s in table])
def test_every_table_device_binds_every_op_natively(name, device):
    """Each device's merged configs are accepted by the Triton wrappers (they reject unknown
    keys and bad tiles), so nothing falls back on a device the table knows."""
    backend = emulate(name, device, REG)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        fns = bound(backend, dt)
        missing = {op: REG.explain(backend, op, OpSpec(dt, allow_fallback=False)) for op, fn in fns.items()
                   if fn is None}
        assert not missing, missing
        for op, fn in fns.items():
            assert fn.ernie_hal_impl in ("triton", "reference", "triton+reference"), (op, fn.ernie_hal_impl)


@needs_interpreter
@pytest.mark.parametrize("name,device", [(n, s.name) for n, table in TABLES.items() for s in table])
def test_every_table_device_binds_the_packed_ops_natively(name, device):
    """A quantized model: embedding, linear, swiglu_mlp, moe_experts and moe take packed weights,
    and every device binds its own Triton kernels for them (its merged configs accepted)."""
    backend = emulate(name, device, REG)
    for scheme in ("wint8", "wint4"):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            impls = conf.bindings(REG, backend, dt, scheme)
            assert set(impls) == {"embedding", "linear", "swiglu_mlp", "moe_experts", "moe"}
            assert all(impl in ("triton", "triton+reference") for impl in impls.values()), (scheme, dt, impls)


@needs_interpreter
def test_implementations_per_backend():
    cuda, rocm, ixuca = (emulate(n, None, REG) for n in ("cuda", "rocm", "ixuca"))
    native_torch = {"embedding", "linear", "kv_cache_write"}
    for backend in (cuda, rocm):
        impls = conf.bindings(REG, backend)
        assert {op for op, impl in impls.items() if impl == "reference"} == native_torch
        assert {impl for op, impl in impls.items() if op not in native_torch} == {"triton"}
    # AITER is first for the norms on ROCm; emulated, it says why it was passed over
    assert "AITER kernels need a ROCm device" in bound(rocm, torch.float16)["rms_norm"].ernie_hal_reason
    assert "takes bfloat16, float16, not float32" in bound(rocm)["rms_norm"].ernie_hal_reason
    impls = conf.bindings(REG, ixuca)
    assert impls["moe_route"] == "reference" and impls["moe"] == "triton+reference"
    assert impls["moe_experts"] == impls["gqa_attention"] == "triton"
    assert "grouped_topk" in bound(ixuca)["moe_route"].ernie_hal_reason


@needs_interpreter
def test_each_device_gets_its_own_configs():
    cfg = {d: bound(emulate(n, d, REG))["gqa_attention"].ernie_hal_config
           for n, d in (("cuda", "H100"), ("cuda", "A100"), ("rocm", "MI300X"), ("rocm", "MI355X"),
                        ("ixuca", "BI-V150"))}
    assert cfg["H100"]["num_stages"] == 3 and cfg["A100"]["num_stages"] == 2
    assert cfg["MI300X"]["kpack"] == 2 and cfg["MI355X"]["kpack"] == 1
    assert cfg["MI300X"]["num_stages"] < cfg["H100"]["num_stages"]
    assert not AMD_KEYS & set(cfg["H100"]) and AMD_KEYS <= set(cfg["MI300X"])
    assert cfg["BI-V150"]["DECODE_BLOCK_N"] == 32
    moe = bound(emulate("rocm", "MI300X", REG))["moe"].ernie_hal_config
    assert all(AMD_KEYS <= set(bucket) for bucket in moe.values())
    assert bound(emulate("rocm", "MI300X", REG))["moe_experts"].ernie_hal_config == moe


@needs_interpreter
def test_kernels_are_bound_once_per_device_and_dtype():
    backend = emulate("cuda", None, REG)
    first, again = bound(backend), bound(backend)
    assert all(first[op] is again[op] for op in OPS)
    assert bound(backend, torch.float16)["moe"] is not first["moe"]


def test_cli_reruns_itself_under_the_interpreter(cli, tmp_path):
    """Started without TRITON_INTERPRET, `--emulate` runs an interpreting child; JSON as specified."""
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = cli(["conformance", "--device", "rocm", "--emulate", "--ops", "rms_norm", "--dtypes", "fp32",
                "--no-model", "--json", str(out)], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    assert {r["op"] for r in results} == {"rms_norm"} and len(results) == 2
    for r in results:
        assert {"backend", "op", "dtype", "shape", "status", "max_error", "reason"} <= set(r)
        assert (r["backend"], r["dtype"], r["status"], r["impl"]) == ("rocm", "float32", "pass", "triton")
        assert r["max_error"] < 1e-5
    assert "AMD Instinct MI300X (emulated)" in proc.stdout and "pass" in proc.stdout


def test_cli_absent_backend_is_a_skip_with_its_probe_reason(cli, tmp_path):
    probe = REG.probe("cuda")
    if probe.available:
        pytest.skip("cuda is present here")
    out = tmp_path / "r.json"
    proc = cli(["conformance", "--device", "cuda", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["status"] == "skip" and r["reason"] == probe.reason for r in rows)
    assert {r["op"] for r in rows} == set(OPS) | {"model", "decode_graphs"}
    assert probe.reason in proc.stdout


# ---- a backend whose kernel is wrong fails the matrix and the command ------------------------
INFO = DeviceInfo(backend="broken", index=0, name="Broken Accelerator", arch="b0", memory_total=1 << 30)


class BrokenPlugin:
    @hookimpl
    def ernie_hal_register_backends(self):
        return [BackendSpec(name="broken", priority=-9, probe=lambda: ProbeResult(True, devices=(INFO,)),
                            factory=lambda i: Backend(INFO, Capabilities(dtypes=(torch.float32,))))]

    @hookimpl
    def ernie_hal_get_kernel(self, backend, op, spec):
        if backend.name == "broken" and op == "rms_norm":
            from ernie_hal.kernels.reference import rms_norm

            def off_by_a_little(x, weight, eps):
                return rms_norm(x, weight, eps) + 1e-2
            return off_by_a_little
        return None

    @hookimpl
    def ernie_hal_explain(self, backend, op, spec):
        return "broken accelerator only has rms_norm" if backend.name == "broken" and op != "rms_norm" else None


def test_a_wrong_kernel_fails_and_missing_ops_skip_with_reasons(monkeypatch, capsys):
    reg = Registry(autoload=False)
    reg.register(BrokenPlugin(), name="broken")
    backend = reg.pick("broken")
    rows = conf.run(reg, backend, ops=["rms_norm", "rope"], dtypes=[torch.float32], models=False)
    norm = [r for r in rows if r.op == "rms_norm"]
    assert norm and all(r.status == "fail" and abs(r.max_error - 1e-2) < 1e-6 for r in norm)
    assert all(r.status == "skip" and "only has rms_norm" in r.reason for r in rows if r.op == "rope")

    import ernie_hal.core.plugins.registry as registry_module
    from ernie_hal.cli.main import main
    monkeypatch.setattr(registry_module, "_default", reg)
    assert main(["conformance", "--device", "broken", "--ops", "rms_norm", "--no-model"]) == 1
    assert "FAIL" in capsys.readouterr().out
