"""Registers the cpu backend. Its kernels: the native GEMV and fused SwiGLU/experts
(backends/cpu/kernels.py) where the native library builds, the reference ops for the rest and
wherever it does not (then the reference ops are the whole CPU path, as in CI without a compiler)."""

import functools

from ...core.plugins.backend import BackendSpec
from ...core.plugins.hookspecs import hookimpl
from .backend import make_backend, probe


@hookimpl
def ernie_hal_register_backends():
    return [BackendSpec(name="cpu", aliases=("host",), priority=0, probe=probe,
                        factory=make_backend, description="host CPU; native GEMV + reference kernels")]


@functools.lru_cache(maxsize=1)
def _fast_ops() -> dict:
    from .native import load
    native, _ = load()
    if native is None:
        return {}
    from .kernels import fast_ops
    return fast_ops(native)


@hookimpl
def ernie_hal_get_kernel(backend, op, spec):
    if backend.name != "cpu":
        return None
    if spec.get("quantization"):
        # weight-only quantized weights: the native wint8/wint4 GEMV, or torch's weight-pack GEMMs (quant_kernels.py)
        from ...kernels.reference import OPS_QUANT
        from .quant_kernels import OPS, OPS_INT8_ACTIVATIONS
        QUANT = OPS_INT8_ACTIVATIONS if spec.get("int8_activations") else OPS
        # norms and attention read no quantized weight: the plain model's fast ops serve
        plain = {k: v for k, v in _fast_ops().items() if k.endswith("rms_norm") or k in ("rope_kv_write", "gqa_attention")}
        return QUANT.get(op) or plain.get(op) or OPS_QUANT.get(op)
    fast = _fast_ops().get(op)
    if fast is not None:
        return fast
    from ...kernels.reference import OPS
    return OPS.get(op)

