"""Registers the NVIDIA CUDA backend (priority 30: only one GPU runtime can be present)."""

from ...core.backend import BackendSpec
from ...core.hookspecs import hookimpl
from .backend import make_backend
from .probe import probe


@hookimpl
def ernie_hal_register_backends():
    return [BackendSpec(name="cuda", aliases=("nvidia",), priority=30, probe=probe,
                        factory=make_backend,
                        description="NVIDIA GPUs through CUDA PyTorch")]


@hookimpl
def ernie_hal_get_kernel(backend, op, spec):
    # the pure-torch reference ops run on the device until the Triton kernels are bound
    if backend.name == "cuda":
        from ...kernels.reference import OPS
        return OPS.get(op)
    return None
