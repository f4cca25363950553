"""Iluvatar CoreX devices. No vendor datasheet was found through the search tools, so each
figure below names where it comes from; treat the bandwidth as unverified.

BI-V150: `ixsmi` lists each visible GPU as "Iluvatar BI-V150" with 32768 MiB
(PaddlePaddle PaddleNLP, Iluvatar llama-13b pre-training doc); FastDeploy calls the card
"BI150 64GB" (docs, Iluvatar ERNIE-4.5-21B training quick start), i.e. two 32 GB devices
per card. torch reports "Iluvatar BI-V150 OAM", capability (7, 1), 16 MPs, warp size 64,
Triton target GPUTarget('corex', 71, 64) (NCIC-AlphaSparse/FlagSparse Iluvatar debug
notes). Bandwidth 1150 GB/s is a third-party measurement (FlagSparse
tools/baseline_bound.py VENDOR_BANDWIDTH_GBS["iluvatar-biv150"]), not a datasheet figure.
Shared memory per block is unknown here: the factory takes torch's value.
"""

from .._torch_cuda_like import GiB, DeviceSpec

ILUVATAR = (
    DeviceSpec("Iluvatar BI-V150", "BI-V150", 32 * GiB, 1150, 64, 0, ("BI V150", "BI150"),
               "ixsmi listings (32768 MiB); bandwidth measured by FlagSparse, unverified"),
)
