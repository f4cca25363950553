"""Iluvatar CoreX kernel choices: per op, the shared Triton kernels or the torch reference, by
what the CoreX stack runs, with the reason kept beside the choice in configs/default.json.

CoreX ships its own Triton (versions like "3.1.0+corex.4.4.0", or FlagTree's "+iluvatar"
builds). What is known to run there comes from FlagGems, which tests its Triton ops on
Iluvatar: tl.dot GEMMs (its Iluvatar mm/bmm overrides), reductions and norms run; its
op_black_list.yaml marks grouped_topk ("all dtypes failed") and topk_softmax unsupported, so
the MoE router (softmax + top-k) stays on torch and `moe` is composed from the torch router
and the Triton experts. fp64 is off on CoreX (FlagGems' vendor descriptor), which no op here
uses. Dtypes per op are data ("dtypes"): an op whose Triton kernel does not take bf16 there
binds the reference for bf16 and the kernel for fp16.
"""

import torch

from .._kernel_binding import KernelBinder, config_dir_of, find_device
from .devices import ILUVATAR

BINDER = KernelBinder("ixuca", config_dir_of(__file__), ILUVATAR)
EMULATED_DEVICES = ("Iluvatar BI-V150",)


def kernel(backend, op, spec):
    return BINDER.kernel(backend, op, spec)


def explain(backend, op, spec):
    return BINDER.explain(backend, op, spec)


def emulated_backend(device: str | None = None):
    """The BI-V150 from the table on CPU tensors, for the Triton interpreter."""
    from ...core.plugins.emulate import EmulatedBackend
    spec = find_device(ILUVATAR, device or EMULATED_DEVICES[0])
    return EmulatedBackend("ixuca", spec, (torch.float32, torch.bfloat16, torch.float16))
