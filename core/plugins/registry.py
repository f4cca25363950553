"""Plugin manager: built-in backends, entry-point plugins, probing and device selection.

Built-ins register through the same hook as third-party plugins (entry-point group
`ernie_hal.backends`). ERNIE_HAL_DISABLE_PLUGIN_AUTOLOAD=1 skips entry points;
ERNIE_HAL_BLOCK_PLUGINS=a,b blocks plugins by name (built-in or entry point).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .backend import Backend, BackendSpec, ProbeResult
from .kernel_table import KernelTable, OpSpec, resolve

ENTRY_POINT_GROUP = "ernie_hal.backends"
DISABLE_AUTOLOAD_ENV = "ERNIE_HAL_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "ERNIE_HAL_BLOCK_PLUGINS"

# Built-ins, in registration order; the reference fallback answers last (trylast).
BUILTIN_PLUGINS = {
    "cpu": "ernie_hal.backends.cpu.plugin",
    "cuda": "ernie_hal.backends.cuda.plugin",
    "rocm": "ernie_hal.backends.rocm.plugin",
    "ixuca": "ernie_hal.backends.ixuca.plugin",
    "reference": "ernie_hal.backends.cpu.fallback_plugin",
}


class DeviceError(RuntimeError):
    """The requested device does not exist, is unavailable, or is too small."""


@dataclass(frozen=True)
class DeviceRequest:
    name: str            # "auto" or a backend name / alias
    index: int | None    # None: first device

    @classmethod
    def parse(cls, text: str) -> "DeviceRequest":
        m = re.fullmatch(r"\s*([A-Za-z][\w\-]*)\s*(?::\s*(\d+))?\s*", text or "auto")
        if not m:
            raise DeviceError(f"bad device {text!r}; use auto, cpu, cuda, rocm, ixuca or NAME:INDEX (e.g. cuda:1)")
        return cls(m.group(1).lower(), None if m.group(2) is None else int(m.group(2)))


class Registry:
    def __init__(self, autoload: bool | None = None, block: tuple = ()):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        blocked = set(block) | {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
        for name in blocked:
            self.pm.set_blocked(name)
        self.load_errors: dict[str, str] = {}
        for name, module in BUILTIN_PLUGINS.items():
            if name in blocked:
                continue
            try:
                self.pm.register(importlib.import_module(module), name=name)
            except ImportError as e:  # a broken built-in must not take the others down
                self.load_errors[name] = f"{type(e).__name__}: {e}"
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0")
        if autoload:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        self._probes: dict[str, ProbeResult] = {}

    def register(self, plugin, name: str | None = None) -> None:
        """Register a plugin object or module at run time (tests, embedding apps)."""
        self.pm.register(plugin, name=name)
        self._probes.clear()

    # ---- backends ---------------------------------------------------------------------------
    def specs(self) -> list[BackendSpec]:
        seen, out = set(), []
        for batch in self.pm.hook.ernie_hal_register_backends():
            for spec in batch or ():
                if spec.name in seen:
                    raise DeviceError(f"two plugins register a backend named {spec.name!r}")
                seen.add(spec.name)
                out.append(spec)
        return out

    def spec(self, name: str) -> BackendSpec:
        for s in self.specs():
            if name == s.name or name in s.aliases:
                return s
        known = ", ".join(sorted(s.name for s in self.specs()))
        raise DeviceError(f"unknown device {name!r}; registered backends: {known}")

    def probe(self, name: str) -> ProbeResult:
        spec = self.spec(name)
        if spec.name not in self._probes:
            try:
                self._probes[spec.name] = spec.probe()
            except Exception as e:  # a probe that crashes means "not available", with why
                self._probes[spec.name] = ProbeResult(False, f"probe failed: {type(e).__name__}: {e}")
        return self._probes[spec.name]

    def pick(self, device: str = "auto", min_memory: int = 0) -> Backend:
        """An explicit device that is missing fails loudly; only auto falls back."""
        req = DeviceRequest.parse(device)
        if req.name != "auto":
            return self._open(self.spec(req.name), req.index or 0, min_memory, explicit=device)
        reasons = []
        for spec in sorted(self.specs(), key=lambda s: -s.priority):
            result = self.probe(spec.name)
            if not result.available:
                reasons.append(f"{spec.name}: {result.reason}")
                continue
            try:
                return self._open(spec, req.index or 0, min_memory, explicit=None)
            except DeviceError as e:
                reasons.append(f"{spec.name}: {e}")
        raise DeviceError("no backend can run this: " + "; ".join(reasons))

    def _open(self, spec: BackendSpec, index: int, min_memory: int, explicit: str | None) -> Backend:
        result = self.probe(spec.name)
        if not result.available:
            raise DeviceError(f"--device {explicit} requested but {spec.name} is not available: {result.reason}")
        count = len(result.devices)
        if count and index >= count:
            raise DeviceError(f"{spec.name}:{index} does not exist; {count} {spec.name} device(s) visible "
                              f"({', '.join(f'{spec.name}:{i}' for i in range(count))})")
        backend = spec.factory(index)
        have = backend.info.memory_total
        if min_memory and have and have < min_memory:
            raise DeviceError(f"{backend.info.label} has {have / 2**30:.1f} GiB, "
                              f"{min_memory / 2**30:.1f} GiB asked (min_memory)")
        return backend

    # ---- kernels ----------------------------------------------------------------------------
    def kernel_table(self, backend: Backend, spec: OpSpec) -> KernelTable:
        return resolve(self.pm.hook.ernie_hal_get_kernel, backend, spec, self.pm.hook.ernie_hal_explain)

    def explain(self, backend: Backend, op: str, spec: OpSpec) -> list[str]:
        return [r for r in self.pm.hook.ernie_hal_explain(backend=backend, op=op, spec=spec) if r]


_default: Registry | None = None


def get_registry() -> Registry:
    global _default
    if _default is None:
        _default = Registry()
    return _default


def reset_registry() -> None:
    """Forget the process-wide registry (tests, or after installing a plugin)."""
    global _default
    _default = None
