"""AMD kernel choices: the shared Triton kernels with AMD configs, and AITER where it binds.

Configs are data in configs/: default.json (CDNA, wavefront 64), gfx942.json (MI300X/MI325X,
64 KB LDS per CU), gfx950.json (MI355X/MI350X, 160 KB LDS), then per device. AMD configs carry
`waves_per_eu`, `matrix_instr_nonkdim` and `kpack`, and fewer pipeline stages than NVIDIA's.

AITER (ROCm/aiter) is tried first where an op's "impl" lists it: only when `import aiter`
works, on a real ROCm device, for the dtypes its kernels take (its CK RMSNorm: bf16/fp16).
Its fused MoE and paged attention are not bound: they want gate+up packed as [E, 2I, H] and
their own KV-cache layout, which this engine's loader and cache do not produce.
"""

import functools

import torch

from .._kernel_binding import KernelBinder, Unavailable, config_dir_of, dtype_name, dtypes_of, find_device
from .devices import AMD

EMULATED_DEVICES = ("AMD Instinct MI300X", "AMD Instinct MI355X")


@functools.lru_cache(maxsize=1)
def _aiter():
    import aiter   # heavy (JIT-built modules): imported once, at bind time
    return aiter


def aiter_kernel(backend, op, entry, dtype):
    allowed = dtypes_of(entry, "aiter_dtypes") or (torch.bfloat16, torch.float16)
    if dtype not in allowed:
        raise Unavailable(f"AITER's {op} takes {', '.join(dtype_name(d) for d in allowed)}, not {dtype_name(dtype)}")
    if backend.device.type != "cuda":   # an emulated device: AITER's kernels need the GPU
        raise Unavailable(f"AITER kernels need a ROCm device; {backend.info.label} runs on {backend.device.type}")
    try:
        aiter = _aiter()
    except Exception as e:
        raise Unavailable(f"aiter is not importable ({type(e).__name__}: {e})") from None
    if op == "rms_norm" and hasattr(aiter, "rmsnorm2d_fwd"):
        return _rms_norm(aiter)
    if op == "add_rms_norm" and hasattr(aiter, "rmsnorm2d_fwd_with_add"):
        return _add_rms_norm(aiter)
    raise Unavailable(f"no AITER adapter for {op} in this aiter version")


def _rms_norm(aiter):
    def rms_norm(x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1])
        return aiter.rmsnorm2d_fwd(x2 if x2.is_contiguous() else x2.contiguous(), weight, eps).view(x.shape)
    return rms_norm


def _add_rms_norm(aiter):
    def add_rms_norm(x, residual, weight, eps):
        x2, r2 = (t.reshape(-1, t.shape[-1]).contiguous() for t in (x, residual))
        out, summed = torch.empty_like(x2), torch.empty_like(x2)
        aiter.rmsnorm2d_fwd_with_add(out, x2, r2, summed, weight, eps)
        return out.view(x.shape), summed.view(x.shape)
    return add_rms_norm


BINDER = KernelBinder("rocm", config_dir_of(__file__), AMD, impls={"aiter": aiter_kernel})


def kernel(backend, op, spec):
    return BINDER.kernel(backend, op, spec)


def explain(backend, op, spec):
    return BINDER.explain(backend, op, spec)


def emulated_backend(device: str | None = None):
    """An AMD Instinct device from the table on CPU tensors, for the Triton interpreter."""
    from ...core.plugins.emulate import EmulatedBackend
    spec = find_device(AMD, device or EMULATED_DEVICES[0])
    return EmulatedBackend("rocm", spec, (torch.float32, torch.bfloat16, torch.float16))
