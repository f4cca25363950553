"""The Iluvatar CoreX backend: torch.cuda verbs on CoreX's PyTorch plus the Iluvatar table."""

import torch

from .._torch_cuda_like import (CudaLikeBackend, bound, lookup, make_caps, make_info, read_props,
                                require_build, triton_version)
from .devices import ILUVATAR
from .probe import build_reason


class IxucaBackend(CudaLikeBackend):
    """An Iluvatar CoreX GPU (BI-V150); torch calls it "cuda:N"."""


def ix_arch(name: str, spec) -> str:
    if spec is not None:
        return spec.arch
    return name.removeprefix("Iluvatar").strip() or "unknown"


def make_backend(index: int = 0) -> IxucaBackend:
    build = require_build(("corex", "cuda"), build_reason)
    props = read_props(index, "ixuca")
    if build == "cuda" and not props.name.startswith("Iluvatar"):
        raise RuntimeError(f"ixuca:{index} is an {props.name}, not an Iluvatar device; use --device cuda")
    spec = lookup(ILUVATAR, "", props.name)
    # bf16: FastDeploy serves ERNIE-4.5 bf16 checkpoints on BI150 (docs/get_started/
    # installation/iluvatar_gpu.md) and Deep-Spark/DeepSparkInference runs models in
    # bfloat16 on CoreX; torch.cuda.is_bf16_supported() would judge capability 7.1 wrongly.
    # CUDA graphs: not confirmed on CoreX, so off. Triton: only Iluvatar's own build
    # (versions like "3.1.0+corex.4.4.0", or FlagTree "+iluvatar") targets the device.
    tv = (triton_version() or "").lower()
    caps = make_caps(props, spec, dtypes=(torch.float32, torch.bfloat16, torch.float16), graphs=False,
                     triton="corex" in tv or "iluvatar" in tv, default_warp=64)
    return bound(IxucaBackend(make_info("ixuca", index, props, ix_arch(props.name, spec), spec), caps))
