"""An out-of-tree backend plugin, as a third party would write one: a "toy" accelerator that
runs on host memory and brings its own rms_norm kernel."""

import torch

import ernie_hal.kernels.reference as ref
from ernie_hal.core.plugins.backend import Backend, BackendSpec, Capabilities, DeviceInfo, ProbeResult
from ernie_hal.core.plugins.hookspecs import hookimpl

INFO = DeviceInfo(backend="toy", index=0, name="Toy Accelerator", arch="toy1",
                  memory_total=2 * 2**30, torch_device="cpu")
CAPS = Capabilities(dtypes=(torch.float32,))


class ToyBackend(Backend):
    pass


def toy_rms_norm(x, weight, eps):
    return ref.rms_norm(x, weight, eps)


toy_rms_norm.ernie_hal_impl = "toy.rms_norm"


@hookimpl
def ernie_hal_register_backends():
    return [BackendSpec(name="toy", aliases=("toyaccel",), priority=-5,
                        probe=lambda: ProbeResult(True, devices=(INFO,)),
                        factory=lambda i: ToyBackend(INFO, CAPS))]


@hookimpl
def ernie_hal_get_kernel(backend, op, spec):
    if backend.name == "toy" and op == "rms_norm":
        return toy_rms_norm
    return None


@hookimpl
def ernie_hal_explain(backend, op, spec):
    if backend.name == "toy" and op != "rms_norm":
        return "toy accelerator only implements rms_norm"
    return None
