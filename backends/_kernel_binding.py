"""How the CUDA-like backends (cuda, rocm, ixuca) bind their kernels: once per (device, dtype).

Each backend keeps its choices as data in `backends/<name>/configs/`, merged per op from
`default.json`, then `<arch>.json` (sm_90, gfx942, ...), then `<device>.json` (the device-table
name with spaces as underscores, e.g. `NVIDIA_H100_SXM.json`). An op entry may carry:

    "impl"       preference list, e.g. ["aiter", "triton"]: the first that binds wins
    "config"     what kernels/triton's make_<op>(config) takes (tiles, warps, stages, AMD extras)
    "dtypes"     dtypes the Triton kernel is used for here (others go to the next impl)
    "config_from" another op whose "config" this one uses (moe_experts: "moe")
    "reason"     why this choice, shown in reports when the choice is not a Triton kernel
    "tolerance"  {"float16": {"atol": .., "rtol": ..}}: the conformance matrix's bound for it

A file may also carry a top-level "tolerance" for every op. Files are read once per process;
each kernel is built once per (backend, op, dtype) and then called directly: nothing here runs
per token. An op none of whose implementations binds returns None, with the reasons, so the
reference plugin answers only when the user allowed fallback.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import types
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from ._torch_cuda_like import _tokens, lookup

# op -> (module in kernels/triton, factory): every factory returns a function with exactly the
# reference op's signature, built from one config dict.
TRITON_OPS = {
    "rms_norm": ("norm", "make_rms_norm"),
    "add_rms_norm": ("norm", "make_add_rms_norm"),
    "rope": ("rope_kv", "make_rope"),
    "rope_kv_write": ("rope_kv", "make_rope_kv_write"),
    "gqa_attention": ("attention", "make_gqa_attention"),
    "swiglu_mlp": ("swiglu", "make_swiglu_mlp"),
    "moe_route": ("moe", "make_moe_route"),
    "moe_experts": ("moe", "make_moe_experts"),
    "moe": ("moe", "make_moe"),
    # weight-only quantized (the op takes PackedWeights; op_key names it "<op>.<scheme>")
    "linear.wint8": ("wlinear", "make_linear_wint"),
    "linear.wint4": ("wlinear", "make_linear_wint"),
    "swiglu_mlp.wint8": ("swiglu_wint", "make_swiglu_mlp_wint"),
    "swiglu_mlp.wint4": ("swiglu_wint", "make_swiglu_mlp_wint"),
    "moe_experts.wint8": ("moe_wint", "make_moe_experts_wint"),
    "moe_experts.wint4": ("moe_wint", "make_moe_experts_wint"),
    "moe.wint8": ("moe_wint", "make_moe_wint"),
    "moe.wint4": ("moe_wint", "make_moe_wint"),
    "embedding.wint8": ("embedding_wint", "make_embedding_wint"),
    "embedding.wint4": ("embedding_wint", "make_embedding_wint"),
}

# Ops the vendor libraries already run well; the backend binds the torch op natively.
TORCH_OPS = {
    "embedding": "a row gather (F.embedding), memory-bound; no kernel of ours would beat it",
    "linear": "F.linear runs on the vendor BLAS (cuBLAS / hipBLASLt / CoreX BLAS)",
    "kv_cache_write": "index_copy_ into the paged cache; the hot path uses the fused rope_kv_write",
    # packed weights stay in the reference layout: the Triton kernels read data/scales directly
    "prepare_weight.wint8": "the Triton kernels read the packed int8 layout as it is",
    "prepare_weight.wint4": "the Triton kernels read the packed int4 layout as it is",
}

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Unavailable(Exception):
    """An implementation cannot run this op here; the message is the reason."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tag(fn: Callable, impl: str, reason: str = "", config=None, tolerance=None) -> Callable:
    """`fn` labelled for reports (`ernie_hal_impl`, read by core.kernels.implementation_label).

    A shared function (a reference op) is copied first: a new function object over the same
    code, so labelling it changes nothing for other backends and adds no call overhead.
    """
    if isinstance(fn, types.FunctionType) and getattr(fn, "ernie_hal_impl", None) is None \
            and fn.__module__.startswith(_REFERENCE):
        g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        g.__kwdefaults__, g.__doc__, g.__qualname__ = fn.__kwdefaults__, fn.__doc__, fn.__qualname__
        g.__module__ = fn.__module__
        g.__dict__.update(fn.__dict__)
        fn = g
    fn.ernie_hal_impl = impl
    fn.ernie_hal_reason = reason
    fn.ernie_hal_config = config
    fn.ernie_hal_tolerance = tolerance
    return fn


_REFERENCE = __name__.rsplit(".", 2)[0] + ".kernels.reference"   # "ernie_hal.kernels.reference"


def reference_op(op: str) -> Callable:
    from ..kernels.reference import OPS, OPS_QUANT
    base, _, scheme = op.partition(".")
    return (OPS_QUANT if scheme else OPS)[base]


def op_key(op: str, spec) -> str:
    """The name an op is bound and configured under: "linear", or "linear.wint4" when the model's
    weights are packed (the kernel then takes PackedWeights, core/quant/format.py)."""
    from ..core.plugins.kernel_table import WEIGHT_OPS
    scheme = spec.get("quantization")
    return f"{op}.{scheme}" if scheme and op in WEIGHT_OPS else op


# ---- config files ----------------------------------------------------------------------------
def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")


@functools.lru_cache(maxsize=None)
def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def load_configs(config_dir: str, stems: tuple) -> dict:
    """Merge `<stem>.json` files in order (later wins, per op entry key). Read once per process."""
    merged = {"ops": {}, "tolerance": {}, "files": []}
    for stem in stems:
        path = os.path.join(config_dir, stem + ".json")
        if not os.path.exists(path):
            continue
        data = _read(path)
        merged["files"].append(os.path.basename(path))
        for dt, tol in (data.get("tolerance") or {}).items():
            merged["tolerance"][dt] = dict(tol)
        for op, entry in (data.get("ops") or {}).items():
            merged["ops"].setdefault(op, {}).update(entry)
    return merged


# ---- one bound op ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    fn: Callable | None      # None: nothing of this backend's binds the op
    impl: str                # "triton", "aiter", "reference", "triton+reference", "" when none
    reason: str              # why (a reference choice, or every implementation's refusal)


@dataclass
class KernelBinder:
    """One backend's kernel choices: its config directory, its device table and any
    implementations of its own beside "triton" and "reference" (AITER, composites).

    `impls` maps an implementation name to `build(backend, op, entry, dtype) -> fn`, which
    raises Unavailable(reason) when it cannot run there.
    """
    backend_name: str
    config_dir: str
    device_table: tuple
    impls: dict = field(default_factory=dict)
    _cache: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def __post_init__(self):
        self.impls.setdefault("composed", composed_moe(self))

    # -- which files apply to a device
    def stems(self, info) -> tuple:
        spec = lookup(self.device_table, "" if info.arch in ("", "unknown") else info.arch, info.name,
                      info.memory_total)
        stems = ["default", file_stem(info.arch)]
        if spec is not None:
            stems.append(file_stem(spec.name))
        stems.append(file_stem(info.name))
        return tuple(dict.fromkeys(s for s in stems if s))

    def configs(self, backend) -> dict:
        return load_configs(self.config_dir, self.stems(backend.info))

    # -- the hooks' answers
    def kernel(self, backend, op: str, spec) -> Callable | None:
        return self.choice(backend, op_key(op, spec), spec.dtype).fn

    def explain(self, backend, op: str, spec) -> str | None:
        c = self.choice(backend, op_key(op, spec), spec.dtype)
        return None if c.fn is not None else f"{self.backend_name}: {c.reason}"

    def choice(self, backend, op: str, dtype: torch.dtype) -> Choice:
        per_backend = self._cache.setdefault(backend, {})
        key = (op, dtype)
        if key not in per_backend:
            per_backend[key] = self._bind(backend, op, dtype)
        return per_backend[key]

    def _bind(self, backend, op: str, dtype: torch.dtype) -> Choice:
        if op not in TRITON_OPS and op not in TORCH_OPS:
            return Choice(None, "", f"no {self.backend_name} kernel for op {op!r}"
                                    + (" (weights packed)" if "." in op else ""))
        cfg = self.configs(backend)
        entry = dict(cfg["ops"].get(op, {}))
        if "config_from" in entry and "config" not in entry:   # e.g. moe_experts tiles = moe's
            entry["config"] = cfg["ops"].get(entry["config_from"], {}).get("config")
        tolerance = {**cfg["tolerance"], **(entry.get("tolerance") or {})}
        prefs = entry.get("impl") or (["triton"] if op in TRITON_OPS else ["reference"])
        prefs = [prefs] if isinstance(prefs, str) else list(prefs)
        refusals = []
        for impl in prefs:
            try:
                fn, reason = self._build(impl, backend, op, entry, dtype)
            except Unavailable as e:
                refusals.append(f"{impl}: {e}")
                continue
            if refusals:
                reason = "; ".join(filter(None, [reason, *(f"not {r}" for r in refusals)]))
            label = composed_label(fn) or impl
            return Choice(tag(fn, label, reason, entry.get("config"), tolerance or None), label, reason)
        return Choice(None, "", "; ".join(refusals) or "no implementation listed")

    def _build(self, impl: str, backend, op: str, entry: dict, dtype: torch.dtype):
        if impl == "reference":
            return reference_op(op), entry.get("reason") or TORCH_OPS.get(op, "the torch reference op")
        if impl == "triton":
            return triton_kernel(backend, op, entry, dtype), entry.get("reason", "")
        build = self.impls.get(impl)
        if build is None:
            raise Unavailable(f"unknown implementation {impl!r} in {self.backend_name}'s configs")
        return build(backend, op, entry, dtype), entry.get("reason", "")


def dtypes_of(entry: dict, key: str = "dtypes") -> tuple | None:
    names = entry.get(key)
    if names is None:
        return None
    unknown = [n for n in names if n not in DTYPE_NAMES]
    if unknown:
        raise Unavailable(f"unknown dtype names {unknown} in configs (use {sorted(DTYPE_NAMES)})")
    return tuple(DTYPE_NAMES[n] for n in names)


def triton_kernel(backend, op: str, entry: dict, dtype: torch.dtype, config=None) -> Callable:
    """kernels/triton's make_<op>(config) for this device, or Unavailable with the reason."""
    if op not in TRITON_OPS:
        raise Unavailable(f"kernels/triton has no kernel for {op}")
    if not backend.caps.triton:
        raise Unavailable(f"Triton cannot launch kernels on {backend.info.label} ({backend.info.arch}): "
                          f"needs a Triton build for this device")
    allowed = dtypes_of(entry)
    if allowed is not None and dtype not in allowed:
        raise Unavailable(f"{dtype_name(dtype)} is not among the dtypes its Triton kernel runs here "
                          f"({', '.join(dtype_name(d) for d in allowed)})")
    module, factory = TRITON_OPS[op]
    make = triton_factory(module, factory)
    cfg = dict(entry.get("config") or {}) if config is None else dict(config)
    try:
        return make(cfg)
    except Exception as e:  # a config the wrapper rejects: say so, don't crash the load
        raise Unavailable(f"kernels/triton/{module}.py {factory} rejected the config {cfg}: "
                          f"{type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=None)
def _import_triton_module(module: str):
    return importlib.import_module(f"{_REFERENCE.rsplit('.', 1)[0]}.triton.{module}")


def triton_factory(module: str, factory: str) -> Callable:
    try:
        mod = _import_triton_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f"triton.{module}"):
            raise Unavailable(f"kernels/triton/{module}.py is not there") from None
        raise Unavailable(f"kernels/triton/{module}.py failed to import: {type(e).__name__}: {e}") from None
    except Exception as e:  # a broken kernel module must not take the backend down
        raise Unavailable(f"kernels/triton/{module}.py failed to import: {type(e).__name__}: {e}") from None
    make = getattr(mod, factory, None)
    if make is None:
        raise Unavailable(f"kernels/triton/{module}.py has no {factory}")
    return make


def config_dir_of(module_file: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(module_file)), "configs")


# ---- implementations any backend may list beside "triton" and "reference" -------------------
def composed_moe(binder: "KernelBinder"):
    """"composed": moe from this backend's own moe_route, moe_experts and swiglu_mlp choices,
    for a device that runs some parts natively and others on the reference (ixuca's router).
    "moe.wint4" composes the packed parts ("moe_experts.wint4", "swiglu_mlp.wint4"); the router
    takes no packed weight."""

    def build(backend, op, entry, dtype):
        base, dot, scheme = op.partition(".")
        if base != "moe":
            raise Unavailable(f"'composed' only builds moe, not {op}")
        names = {"moe_route": "moe_route", "moe_experts": f"moe_experts{dot}{scheme}",
                 "swiglu_mlp": f"swiglu_mlp{dot}{scheme}"}
        parts = {p: binder.choice(backend, name, dtype) for p, name in names.items()}
        missing = [f"{p} ({c.reason})" for p, c in parts.items() if c.fn is None]
        if missing:
            raise Unavailable("parts not bound: " + "; ".join(missing))
        route, experts, mlp = (parts[p].fn for p in ("moe_route", "moe_experts", "swiglu_mlp"))

        def moe(x, router_weight, correction_bias, w_gate, w_up, w_down, top_k, norm_min, shared=None):
            weights, ids = route(x, router_weight, correction_bias, top_k, norm_min)
            out = experts(x, weights, ids, w_gate, w_up, w_down)
            if shared is not None:
                out = out + mlp(x, *shared)
            return out

        moe.ernie_hal_parts = {p: c.impl for p, c in parts.items()}
        return moe

    return build


def composed_label(fn) -> str:
    parts = getattr(fn, "ernie_hal_parts", None)
    return "+".join(sorted(set(parts.values()), key=lambda impl: impl == "reference")) if parts else ""


# ---- emulation: a device from the table, CPU tensors, kernels under the Triton interpreter ---
def find_device(table: tuple, text: str | None):
    """A table entry by exact name, arch ("gfx950": its first entry) or name tokens ("A100",
    "MI355X": the first entry whose name has them all)."""
    if not text:
        return table[0]
    for s in table:
        if s.name.lower() == text.lower():
            return s
    for s in table:
        if s.arch.lower() == text.lower():
            return s
    want = _tokens(text)
    for s in table:
        if want and want <= _tokens(s.name):
            return s
    spec = lookup(table, "", text)
    if spec is not None:
        return spec
    names = ", ".join(s.name for s in table)
    raise ValueError(f"no device {text!r} in this backend's table; choose one of: {names}")
