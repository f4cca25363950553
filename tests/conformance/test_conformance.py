"""The conformance matrix: backend x op x dtype x shape, every result against kernels/reference
run on the CPU in float64, with one per-dtype tolerance table (core/checks/conformance.py), and a whole
tiny dense and MoE model per backend against the CPU model.

Backends: every registered backend natively (an absent one skips with its probe reason), plus
the cuda, rocm and ixuca kernels emulated with their own per-device configs under the Triton
interpreter (see conftest.py). Under the interpreter fp32 and fp16 run; bf16 Triton kernels are
skipped (the interpreter's bf16 arithmetic is wrong) and run natively on a GPU. Shapes are tiny
(each names the edge it covers); production widths are marked slow.
"""

import json
import sys
from dataclasses import dataclass

import pytest
import torch

from ernie_hal.core.checks import conformance as conf
from ernie_hal.core.plugins.emulate import EmulationError, emulatable, emulate, interpreter_problem
from ernie_hal.core.plugins.kernel_table import OPS
from ernie_hal.core.plugins.registry import DeviceError, get_registry

REG = get_registry()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Emulated devices: (backend, table device, ops or None for all, slow). One device per backend
# runs everything; MI355X (gfx950) adds the ops whose tiles differ from gfx942's.
EMULATED = (
    ("cuda", "H100", None, False),
    ("cuda", "A100", None, True),
    ("rocm", "MI300X", None, False),
    ("rocm", "MI355X", ("gqa_attention", "moe_experts", "moe", "moe.wint8", "moe.wint4", "model"), False),
    ("ixuca", "BI-V150", None, False),
)
# Checked when this module is imported, after conftest.py has set (or not) TRITON_INTERPRET.
INTERPRETER = interpreter_problem()


@dataclass(frozen=True)
class Target:
    id: str
    name: str
    device: str | None = None      # None: native; else the table device to emulate
    ops: tuple | None = None
    absent: str = ""               # the probe's reason when the native backend is not here
    slow: bool = False

    def wants(self, op: str) -> bool:
        return self.ops is None or op in self.ops


def _targets() -> list:
    out = []
    for spec in sorted(REG.specs(), key=lambda s: (-s.priority, s.name)):
        probe = REG.probe(spec.name)
        out.append(Target(spec.name, spec.name, absent="" if probe.available else probe.reason))
    for name, device, ops, slow in EMULATED:
        out.append(Target(f"{name}-{device}-emulated", name, device, ops, slow=slow))
    return out


TARGETS = _targets()
GPU_BACKENDS = set(emulatable(REG))   # the backends whose kernels are Triton (cuda, rocm, ixuca)
_backends: dict = {}


def _interpreting() -> bool:
    loaded = sys.modules.get("ernie_hal.kernels.triton._interpret")
    return bool(loaded is not None and loaded.INTERPRET)


def backend_for(t: Target):
    if t.absent:
        pytest.skip(f"{t.name} is not here: {t.absent}")
    if t.device is not None and INTERPRETER:
        pytest.skip(f"emulated in a child process (test_emulated_in_child_process): {INTERPRETER}")
    if t.device is None and t.name in GPU_BACKENDS and _interpreting():
        pytest.skip("kernels/triton was imported under TRITON_INTERPRET=1 in this process (the "
                    "tests/unit Triton tests do that): run `pytest tests/conformance` on its own for "
                    "the native GPU matrix")
    if t.id not in _backends:
        try:
            _backends[t.id] = REG.pick(t.name) if t.device is None else emulate(t.name, t.device, REG)
        except (EmulationError, DeviceError) as e:
            _backends[t.id] = str(e)
    b = _backends[t.id]
    if isinstance(b, str):
        pytest.skip(b)
    return b


def check(r: conf.Result):
    if r.status == "skip":
        pytest.skip(r.reason)
    assert r.status == "pass", f"{r.backend} {r.op} {r.dtype} [{r.shape}] ({r.impl}): {r.reason}; " \
                               f"max abs error {r.max_error}"


def _marks(t: Target, slow: bool = False):
    return [pytest.mark.slow] if (t.slow or slow) else []


def _op_params():
    params = []
    for t in TARGETS:
        if t.absent:   # one skip per op says why, rather than one per dtype and shape
            params += [pytest.param(t, op, None, None, id=f"{t.id}-{op}") for op in OPS if t.wants(op)]
            continue
        for case in conf.CASES:
            if not t.wants(case.op):
                continue
            for dt in DTYPES:
                params.append(pytest.param(t, case.op, case, dt, marks=_marks(t, case.slow),
                                           id=f"{t.id}-{case.op}-{conf.dtype_name(dt)}-{case.shape}"))
    return params


@pytest.mark.parametrize("target,op,case,dtype", _op_params())
def test_op(target, op, case, dtype):
    backend = backend_for(target)
    check(conf.run_case(REG, backend, case, dtype))


def _model_params():
    params = []
    for t in TARGETS:
        if not t.wants("model"):
            continue
        for preset in conf.MODEL_PRESETS:
            for dt in DTYPES:
                params.append(pytest.param(t, preset, dt, marks=_marks(t),
                                           id=f"{t.id}-{preset}-{conf.dtype_name(dt)}"))
    return params


@pytest.mark.parametrize("target,preset,dtype", _model_params())
def test_model(target, preset, dtype):
    """A whole tiny model on the backend (ragged prefill, then decode) against the cpu model."""
    backend = backend_for(target)
    check(conf.run_model(REG, backend, preset, dtype))


@pytest.mark.parametrize("target,dtype", [pytest.param(t, dt, id=f"{t.id}-{conf.dtype_name(dt)}")
                                          for t in TARGETS if t.device is None for dt in DTYPES])
def test_decode_graphs_equal_eager(target, dtype):
    """Where a backend captures device graphs (cuda, rocm), replayed decode gives eager's ids."""
    backend = backend_for(target)
    check(conf.run_decode_graphs(backend, "tiny-moe", dtype))


@pytest.mark.parametrize("target", [pytest.param(t, id=t.id, marks=_marks(t)) for t in TARGETS if t.device],)
def test_emulated_in_child_process(target, cli, tmp_path):
    """Where this process cannot interpret (a GPU is here, or triton was imported first), the
    emulated matrix runs in `ernie-hal conformance --emulate`, which starts an interpreting child."""
    if not INTERPRETER:
        pytest.skip("ran in this process (test_op / test_model)")
    out = tmp_path / "results.json"
    args = ["conformance", "--device", target.name, "--emulate", "--emulate-device", target.device,
            "--json", str(out)] + (["--ops", *target.ops] if target.ops else [])
    proc = cli(args, timeout=1200)
    results = json.loads(out.read_text())["results"]
    failed = [r for r in results if r["status"] == "fail"]
    assert proc.returncode == 0 and not failed, proc.stdout[-4000:] + proc.stderr[-4000:]
