"""Registers the NVIDIA CUDA backend (priority 30: only one GPU runtime can be present)."""

from ...core.plugins.backend import BackendSpec
from ...core.plugins.hookspecs import hookimpl
from . import kernels
from .backend import make_backend
from .probe import probe


@hookimpl
def ernie_hal_register_backends():
    return [BackendSpec(name="cuda", aliases=("nvidia",), priority=30, probe=probe,
                        factory=make_backend,
                        description="NVIDIA GPUs through CUDA PyTorch")]


@hookimpl
def ernie_hal_get_kernel(backend, op, spec):
    """This backend's own kernel for op (bound once per device and dtype), or None."""
    if backend.name != "cuda":
        return None
    return kernels.kernel(backend, op, spec)


@hookimpl
def ernie_hal_explain(backend, op, spec):
    """Why this backend has no kernel of its own for op here (None when it has one)."""
    if backend.name != "cuda":
        return None
    return kernels.explain(backend, op, spec)


def emulated_backend(device=None):
    """A device from this backend's table on CPU tensors, its kernels under the Triton
    interpreter (core/plugins/emulate.py, `ernie-hal conformance --emulate`)."""
    return kernels.emulated_backend(device)
