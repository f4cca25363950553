"""What the Triton wrappers need to know about where their kernels run: the CPU interpreter or a
GPU target, and which launch options that target takes.

`TRITON_INTERPRET` is read once, here, at import (Triton itself reads it when a kernel is
decorated, so setting it later changes nothing anyway).

Interpreter facts (Triton 3.9, measured): loads, stores and casts of bf16 are exact, but bf16
arithmetic and `tl.dot` on bf16 operands give garbage; fp16 and fp32 are fine. Kernels therefore
upcast to fp32 right after loading and take a `DOT_FP32` constexpr (== INTERPRET) that upcasts
`tl.dot` operands. Its fp32 -> bf16 cast truncates instead of rounding to nearest even (its
`fp_downcast_rounding="rtne"` path rounds ties away and drops the mantissa carry, and subnormals
come out wrong), so kernels round to 16 bits through `cast_rtne`, which does the rounding on the
bits under the interpreter and is a plain `.to` on GPUs.

The interpreter also drops every launch keyword it does not know — typos such as `num_warp=8`
included — while a GPU launch raises `KeyError` for options of another vendor (`waves_per_eu`
on CUDA); `check_keys` rejects unknown config keys and `launch_options` filters by target.
The interpreter needs TRITON_INTERPRET=1 in the environment while kernels run, not only when
they are decorated (it imports gluon lazily, which asserts on it).
"""

import functools
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET_C = tl.constexpr(INTERPRET)  # readable inside @triton.jit

# Launch options every target takes, and those only the AMD (HIP) backend takes.
COMMON_OPTIONS = ("num_warps", "num_stages")
AMD_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")


def interpreter_problem() -> str:
    """"" when kernels in this process really run under the interpreter, else why not. Both
    kernels/triton and triton itself must be imported with TRITON_INTERPRET=1 set: triton.language's
    own @jit helpers (tl.sum, tl.max, tl.cdiv, ...) are decorated when triton is first imported,
    and compiled-mode helpers fail inside interpreted kernels ("Cannot call @triton.jit'd outside
    of the scope of a kernel"). transformers, for one, imports triton."""
    if not INTERPRET:
        return "kernels/triton was imported without TRITON_INTERPRET=1"
    from triton.language import standard
    if type(standard.sum).__name__ != "InterpretedFunction":
        return "triton was imported before TRITON_INTERPRET=1 was set in this process"
    return ""


@functools.lru_cache(maxsize=None)
def target_backend() -> str:
    """'interpreter', 'cuda' or 'hip' (the active Triton driver's target; cached)."""
    if INTERPRET:
        return "interpreter"
    from triton.runtime import driver
    return driver.active.get_current_target().backend


def check_keys(config: dict, allowed, where: str) -> None:
    """Unknown keys are an error here, since the interpreter would silently ignore them."""
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}; allowed: {sorted(allowed)}")


def launch_options(config: dict) -> dict:
    """num_warps/num_stages where given, plus the AMD extras where given and the target takes
    them (HIP, or the interpreter, which ignores them); dropped on CUDA, where they would raise."""
    opts = {k: config[k] for k in COMMON_OPTIONS if config.get(k) is not None}
    if target_backend() in ("hip", "interpreter"):
        opts.update({k: config[k] for k in AMD_OPTIONS if config.get(k) is not None})
    return opts


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), rounded to nearest even on every target. On GPUs that is what `.to` does;
    the interpreter truncates fp32 -> bf16 (and mangles subnormals), so there the rounding is
    done on the fp32 bits and the top half reinterpreted as bf16 (quiet NaNs stay NaN)."""
    if _INTERPRET_C and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
