"""Registers the Iluvatar CoreX backend (priority 30: only one GPU runtime can be present)."""

from ...core.backend import BackendSpec
from ...core.hookspecs import hookimpl
from .backend import make_backend
from .probe import probe


@hookimpl
def ernie_hal_register_backends():
    return [BackendSpec(name="ixuca", aliases=("iluvatar", "corex"), priority=30, probe=probe,
                        factory=make_backend,
                        description="Iluvatar CoreX BI-V150 through CoreX PyTorch (IXUCA)")]


@hookimpl
def ernie_hal_get_kernel(backend, op, spec):
    # the pure-torch reference ops run on the device until the Triton kernels are bound
    if backend.name == "ixuca":
        from ...kernels.reference import OPS
        return OPS.get(op)
    return None
