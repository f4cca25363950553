"""NVIDIA kernel choices: the shared Triton kernels (kernels/triton) with NVIDIA configs.

Configs are data in configs/: default.json (any NVIDIA GPU Triton runs on), sm_80.json,
sm_90.json, then per device (NVIDIA_H100_SXM.json, ...). Tiles follow the vendor's shared
memory per block (A100 163 KB, H100 227 KB: devices.py), 4-8 warps of 32 lanes, 3-4 stages.
"""

import torch

from .._kernel_binding import KernelBinder, config_dir_of, find_device
from .devices import NVIDIA

BINDER = KernelBinder("cuda", config_dir_of(__file__), NVIDIA)

# What `--emulate` runs when no device is named: Hopper first, then Ampere.
EMULATED_DEVICES = ("NVIDIA H100 SXM", "NVIDIA A100 80GB SXM")


def kernel(backend, op, spec):
    return BINDER.kernel(backend, op, spec)


def explain(backend, op, spec):
    return BINDER.explain(backend, op, spec)


def emulated_backend(device: str | None = None):
    """An NVIDIA device from the table on CPU tensors, for the Triton interpreter."""
    from ...core.plugins.emulate import EmulatedBackend
    spec = find_device(NVIDIA, device or EMULATED_DEVICES[0])
    # the factory's rule: bf16 from sm_80 (every table entry is sm_80 or newer)
    return EmulatedBackend("cuda", spec, (torch.float32, torch.bfloat16, torch.float16))
