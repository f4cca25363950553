"""Pure-torch reference ops: the oracle, the CPU production path and every backend's fallback.

Each op takes and returns plain tensors; `OPS` is the table the kernel resolver binds.
"""

from .attention import gqa_attention, kv_cache_write
from .linear import embedding, linear
from .mlp import swiglu_mlp
from .moe import moe, moe_experts, moe_route
from .norm import add_rms_norm, rms_norm
from .rope import rope, rope_kv_write
from . import quantized as _q

OPS = {
    "embedding": embedding,
    "linear": linear,
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "rope": rope,
    "kv_cache_write": kv_cache_write,
    "rope_kv_write": rope_kv_write,
    "gqa_attention": gqa_attention,
    "swiglu_mlp": swiglu_mlp,
    "moe_route": moe_route,
    "moe_experts": moe_experts,
    "moe": moe,
}

# The same table for weight-only quantized models: ops that take weights get packed ones
# (kernels/reference/quantized.py), the rest are shared; prepare_weight gives the layout they read.
OPS_QUANT = {**OPS, "embedding": _q.embedding, "linear": _q.linear, "swiglu_mlp": _q.swiglu_mlp,
             "moe_experts": _q.moe_experts, "moe": _q.moe, "prepare_weight": _q.prepare_weight}


def ops_for(spec) -> dict:
    """The reference table for a kernel spec (OpSpec): quantized or plain weights."""
    return OPS_QUANT if spec.get("quantization") else OPS


__all__ = ["OPS", "OPS_QUANT", "ops_for", *OPS]
