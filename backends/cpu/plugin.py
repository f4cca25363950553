"""Registers the cpu backend; its kernels are the reference ops (the numerical oracle)."""

from ...core.plugins.backend import BackendSpec
from ...core.plugins.hookspecs import hookimpl
from .backend import make_backend, probe


@hookimpl
def ernie_hal_register_backends():
    return [BackendSpec(name="cpu", aliases=("host",), priority=0, probe=probe,
                        factory=make_backend, description="host CPU; reference kernels (oracle)")]


@hookimpl
def ernie_hal_get_kernel(backend, op, spec):
    if backend.name != "cpu":
        return None
    from ...kernels.reference import OPS
    return OPS.get(op)
