"""Which implementation each op of a backend binds: its own kernel (never the reference
fallback) or the reasons it has none. Shared by the device smoke test and the conformance matrix."""

from __future__ import annotations

import torch

from .kernel_table import OPS, WEIGHT_OPS, OpSpec, implementation_label

_REFERENCE = __name__.split(".")[0] + ".kernels.reference"   # "ernie_hal.kernels.reference"


def native_kernel(registry, backend, op: str, dtype: torch.dtype):
    """(fn, skip reason): the backend's own kernel, never the reference fallback. "linear.wint4"
    names the op for weight-only quantized weights (a model spec with that scheme)."""
    op, _, scheme = op.partition(".")
    facts = (("group_size", 128), ("quantization", scheme)) if scheme else ()
    spec = OpSpec(dtype=dtype, facts=facts, allow_fallback=False)
    fn = registry.pm.hook.ernie_hal_get_kernel(backend=backend, op=op, spec=spec)
    if fn is not None:
        return fn, ""
    reasons = registry.explain(backend, op, spec)
    return None, "; ".join(reasons) or f"{backend.name} binds no kernel for {op}"


def impl_of(fn) -> str:
    label = implementation_label(fn)
    return "reference" if label.startswith(_REFERENCE) else label


def bindings(registry, backend, dtype: torch.dtype = torch.float32, scheme: str | None = None) -> dict:
    """op -> "impl" or "reference (fallback: reasons)": which implementation each op runs.
    `scheme` ("wint8", "wint4"): the ops that take packed weights, for a model quantized so."""
    out = {}
    for op in OPS if scheme is None else [op for op in OPS if op in WEIGHT_OPS]:
        fn, why = native_kernel(registry, backend, f"{op}.{scheme}" if scheme else op, dtype)
        out[op] = impl_of(fn) if fn is not None else f"reference (fallback: {why})"
    return out
