"""KernelTable: op name -> callable, bound once per model load through the hooks.

The forward pass calls plain attributes of this table; no pluggy call, no backend-name
compare happens per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Every op a backend provides (ARCHITECTURE.md "Ops every backend provides").
OPS = ("embedding", "linear", "rms_norm", "add_rms_norm", "rope", "kv_cache_write",
       "rope_kv_write", "gqa_attention", "swiglu_mlp", "moe_route", "moe_experts", "moe")
# Bound too when weights are quantized: prepare_weight(packed, role, staged=False) -> the layout the
# backend's linear / swiglu_mlp / moe / embedding read, called once per weight at load. staged=True
# (core/memory/offload.py): the weight is a view of a staging buffer that is refilled between uses,
# so the answer must read its data and scales in place at call time (no copy, no layout change).
QUANT_OPS = ("prepare_weight",)
# Ops whose weights arrive packed in a quantized model.
WEIGHT_OPS = ("embedding", "linear", "swiglu_mlp", "moe_experts", "moe", "prepare_weight")


@dataclass(frozen=True)
class OpSpec:
    """What a kernel is asked to handle: dtype plus shape facts (head_dim, experts, ...)."""
    dtype: torch.dtype
    facts: tuple = ()             # sorted (key, value) pairs, hashable
    allow_fallback: bool = True   # may the reference plugin answer for a non-reference backend

    def get(self, key, default=None):
        return dict(self.facts).get(key, default)

    @classmethod
    def for_model(cls, config, dtype, allow_fallback=True, quant=None) -> "OpSpec":
        """`quant`: a QuantSpec (core/quant) when the weights are packed."""
        facts = dict(hidden_size=config.hidden_size, head_dim=config.head_dim,
                     num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                     num_experts=config.moe_num_experts, top_k=config.moe_k)
        if quant is not None:
            facts.update(quantization=quant.scheme, group_size=quant.group_size)
            if quant.int8_activations:
                facts.update(int8_activations=True)
        return cls(dtype=dtype, facts=tuple(sorted(facts.items())), allow_fallback=allow_fallback)


class KernelNotAvailable(RuntimeError):
    """No plugin answered for an op and fallback to the reference was not allowed."""


@dataclass
class KernelTable:
    ops: dict = field(default_factory=dict)       # op -> callable
    sources: dict = field(default_factory=dict)   # op -> implementation label

    def __getattr__(self, op):
        try:
            return self.__dict__["ops"][op]
        except KeyError:
            raise AttributeError(op) from None

    def describe(self) -> dict:
        return dict(self.sources)


def implementation_label(fn) -> str:
    """Where a kernel comes from, for reports: an explicit tag or its module."""
    return getattr(fn, "ernie_hal_impl", None) or getattr(fn, "__module__", "?") or "?"


def resolve(hook, backend, spec: OpSpec, explain=None) -> KernelTable:
    """Ask the firstresult hook once per op; raise with every plugin's reasons if unbound."""
    table = KernelTable()
    for op in OPS + (QUANT_OPS if spec.get("quantization") else ()):
        fn = hook(backend=backend, op=op, spec=spec)
        if fn is None:
            reasons = [r for r in (explain(backend=backend, op=op, spec=spec) if explain else []) if r]
            why = "; ".join(reasons) or "no plugin provides it"
            raise KernelNotAvailable(
                f"op {op!r} has no kernel on {backend.info.label} for {spec.dtype}{_quant_label(spec)}: {why}. "
                f"Allow fallback to the reference kernels (--allow-fallback) or pick another device.")
        table.ops[op] = fn
        table.sources[op] = implementation_label(fn)
    return table


def _quant_label(spec: OpSpec) -> str:
    q = spec.get("quantization")
    return f" with {q} weights (group size {spec.get('group_size')})" if q else ""
