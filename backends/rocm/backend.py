"""The AMD ROCm backend: torch.cuda verbs (HIP underneath) plus the AMD device table."""

import torch

from .._torch_cuda_like import (CudaLikeBackend, bound, lookup, make_caps, make_info, read_props,
                                require_build, triton_version)
from .devices import AMD
from .probe import build_reason

# Triton's AMD backend targets CDNA2+ and RDNA3+ (triton-lang/triton third_party/amd;
# README: "AMD GPUs (ROCm 6.2+)").
TRITON_ARCHS = ("gfx90a", "gfx942", "gfx950", "gfx11", "gfx12")


class RocmBackend(CudaLikeBackend):
    """An AMD Instinct GPU; wavefront 64 on CDNA, LDS per CU from the table."""


def gfx_arch(gcn_arch_name: str) -> str:
    """'gfx942:sramecc+:xnack-' -> 'gfx942' (the part before the first colon)."""
    return (gcn_arch_name or "").split(":")[0].strip().lower()


def make_backend(index: int = 0) -> RocmBackend:
    require_build(("hip",), build_reason)
    props = read_props(index, "rocm")
    spec = lookup(AMD, gfx_arch(props.gcn_arch), props.name, props.total_memory)
    arch = gfx_arch(props.gcn_arch) or (spec.arch if spec else "unknown")
    # bf16 is native on CDNA2+ (ROCm docs "Data types and precision support"); PyTorch
    # captures hipGraphs through torch.cuda.graphs on ROCm, as vLLM's ROCm platform does.
    caps = make_caps(props, spec, dtypes=(torch.float32, torch.bfloat16, torch.float16),
                     graphs=True, triton=arch.startswith(TRITON_ARCHS) and triton_version() is not None,
                     default_warp=64 if arch.startswith("gfx9") else 32)
    return bound(RocmBackend(make_info("rocm", index, props, arch, spec), caps))
