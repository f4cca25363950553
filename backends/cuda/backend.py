"""The NVIDIA CUDA backend: torch.cuda memory verbs plus the NVIDIA device table."""

import torch

from .._torch_cuda_like import (CudaLikeBackend, bound, lookup, make_caps, make_info, read_props,
                                require_build, triton_version)
from .devices import NVIDIA
from .probe import build_reason


class CudaBackend(CudaLikeBackend):
    """An NVIDIA GPU; verbs come from CudaLikeBackend, facts from NVIDIA's table."""


def make_backend(index: int = 0) -> CudaBackend:
    require_build(("cuda",), build_reason)
    props = read_props(index, "cuda")
    if props.name.startswith("Iluvatar"):  # a CoreX torch without its version marker
        raise RuntimeError(f"cuda:{index} is an {props.name}; use --device ixuca")
    arch = f"sm_{props.major}{props.minor}"
    spec = lookup(NVIDIA, arch, props.name, props.total_memory)
    # bf16 runs natively from sm_80 (Ampere); Triton supports compute capability 8.0+
    # (triton-lang/triton README, "Supported Hardware").
    modern = props.major >= 8
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if modern else (torch.float32, torch.float16)
    caps = make_caps(props, spec, dtypes=dtypes, graphs=True,
                     triton=modern and triton_version() is not None, default_warp=32)
    return bound(CudaBackend(make_info("cuda", index, props, arch, spec), caps))
