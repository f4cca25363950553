"""Emulated GPU backends: a device from a GPU backend's table (H100, MI300X, MI355X, BI-V150),
CPU tensors, and that backend's own kernels and configs, run by the Triton interpreter.

CI has no GPU; this is how it checks the GPU backends' kernel logic and per-device configs. A
backend is emulatable when its plugin module offers `emulated_backend(device=None)` (the
built-in cuda, rocm and ixuca plugins do); its kernels bind through its own hooks, exactly as
on the real device, because the emulated backend carries that backend's name.

Triton reads TRITON_INTERPRET when it decorates a kernel and again when it runs one, so a
process either interprets or it does not. Nothing here writes os.environ: the CLI re-runs itself
in a child process with the variable set (`interpreted_env`), and tests set it in their
conftest before anything imports kernels/triton.
"""

from __future__ import annotations

import os
import sys

import torch

from .backend import Backend, Capabilities, DeviceInfo

PACKAGE = __name__.split(".")[0]               # "ernie_hal"
INTERPRET_ENV = "TRITON_INTERPRET"


class EmulationError(RuntimeError):
    """This process cannot emulate the backend (no interpreter, no triton, no such device)."""


class EmulatedBackend(Backend):
    """A table device on the CPU: info and caps as the real one would report them, host memory,
    and `caps.triton` True because the interpreter launches the Triton kernels."""

    emulated = True

    def __init__(self, backend: str, spec, dtypes: tuple):
        info = DeviceInfo(backend=backend, index=0, name=f"{spec.name} (emulated)", arch=spec.arch,
                          memory_total=spec.memory, bandwidth_gbps=spec.bandwidth_gbps, torch_device="cpu")
        caps = Capabilities(dtypes=tuple(dtypes), warp_size=spec.warp_size,
                            max_shared_memory=spec.shared_memory, triton=True)
        super().__init__(info, caps)
        self.emulates = spec

    def _device_free(self):
        import psutil
        return psutil.virtual_memory().available   # its "device" memory is host memory


def interpreter_problem() -> str:
    """"" when this process runs Triton kernels under the interpreter, else why it cannot."""
    if os.environ.get(INTERPRET_ENV) != "1":
        return (f"{INTERPRET_ENV}=1 is not set in this process (set it before Python starts, or use "
                f"`ernie-hal conformance --emulate`, which runs itself again with it set)")
    loaded = sys.modules.get(f"{PACKAGE}.kernels.triton._interpret")
    if loaded is not None and not getattr(loaded, "INTERPRET", False):
        return f"kernels/triton was imported before {INTERPRET_ENV}=1 was set in this process"
    standard = sys.modules.get("triton.language.standard")
    if standard is not None and type(getattr(standard, "sum", None)).__name__ != "InterpretedFunction":
        # triton.language's own @jit helpers (tl.sum, ...) were compiled-mode objects: any
        # earlier `import triton` (torch.compile imports it too) fixes that for the process
        return f"triton was imported before {INTERPRET_ENV}=1 was set in this process"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton is not importable ({type(e).__name__}: {e}); pip install 'ernie-hal[triton]'"
    return ""


def interpreted_env(env: dict | None = None) -> dict:
    """A copy of the environment for a child process that interprets Triton kernels."""
    return {**(os.environ if env is None else env), INTERPRET_ENV: "1"}


def emulatable(registry) -> list:
    """Names of the registered backends whose plugin can build an emulated device."""
    out = []
    for spec in registry.specs():
        plugin = registry.pm.get_plugin(spec.name)
        if callable(getattr(plugin, "emulated_backend", None)):
            out.append(spec.name)
    return out


def emulate(name: str, device: str | None = None, registry=None) -> Backend:
    """The emulated backend `name` ("rocm", ...) for `device` from its table (default: its
    first emulated device), or EmulationError with the reason it cannot run here."""
    from .registry import get_registry
    reg = registry or get_registry()
    spec = reg.spec(name)
    plugin = reg.pm.get_plugin(spec.name)
    make = getattr(plugin, "emulated_backend", None)
    if not callable(make):
        raise EmulationError(f"backend {spec.name!r} cannot be emulated: its plugin has no emulated_backend()")
    problem = interpreter_problem()
    if problem:
        raise EmulationError(f"cannot emulate {spec.name}: {problem}")
    try:
        return make(device)
    except ValueError as e:
        raise EmulationError(str(e)) from None


def emulated(backend) -> bool:
    return bool(getattr(backend, "emulated", False))


def float_dtypes(backend) -> tuple:
    return tuple(d for d in backend.caps.dtypes if d in (torch.float32, torch.float16, torch.bfloat16))
