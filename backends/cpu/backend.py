"""The CPU backend: host memory is the device; the reference kernels are its kernels."""

from __future__ import annotations

import os
import platform

import psutil
import torch

from ...core.plugins.backend import Backend, Capabilities, DeviceInfo, ProbeResult

CPU_CAPS = Capabilities(
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    pinned_host_memory=False, async_copy=False, streams=False, graphs=False,
    warp_size=1, max_shared_memory=0, triton=False, unified_memory=True, int8_activations=True)


def cpu_info() -> DeviceInfo:
    mem = psutil.virtual_memory()
    name = _cpu_model_name() or platform.processor() or "CPU"
    return DeviceInfo(backend="cpu", index=0, name=f"{name} ({os.cpu_count()} cores)",
                      arch=platform.machine() or "unknown", memory_total=mem.total,
                      memory_free=mem.available, torch_device="cpu")


def probe() -> ProbeResult:
    return ProbeResult(available=True, devices=(cpu_info(),))


class CpuBackend(Backend):
    """The device is host memory: `alloc` is accounted against the budget like any device's,
    pinned buffers are plain memory, copies are synchronous, streams and events are None."""

    def __init__(self, budget: int | None = None):
        super().__init__(cpu_info(), CPU_CAPS, budget)

    def _device_free(self):
        return psutil.virtual_memory().available


def make_backend(index: int = 0) -> CpuBackend:
    if index != 0:
        raise ValueError(f"cpu has one device (cpu:0); cpu:{index} does not exist")
    return CpuBackend()


def _cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
