"""The conformance suite runs each backend present here natively and, without a GPU, the cuda,
rocm and ixuca kernels emulated: their own configs, CPU tensors, the Triton interpreter.

Triton decides at import whether it interprets (its own tl.sum & co. are decorated then), so
TRITON_INTERPRET=1 is set here, when pytest loads this file and before any test module imports
triton — only when no GPU backend is present, so a GPU machine runs the same suite natively.
If triton was imported without it earlier in the process anyway (or a GPU is present), the
emulated backends run in a child process instead (test_emulated_in_child_process).
"""

import os


def _gpu_backend_present() -> bool:
    from ernie_hal.core.plugins.emulate import emulatable
    from ernie_hal.core.plugins.registry import Registry
    reg = Registry()
    return any(reg.probe(name).available for name in emulatable(reg))


if "TRITON_INTERPRET" not in os.environ and not _gpu_backend_present():
    os.environ["TRITON_INTERPRET"] = "1"
