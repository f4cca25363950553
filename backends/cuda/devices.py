"""NVIDIA devices by compute capability: datasheet memory and bandwidth, as data.

Shared memory is the per-block opt-in maximum for the compute capability (CUDA C++
Programming Guide, "Technical Specifications per Compute Capability": 8.0 163 KB, 8.6/8.9
99 KB, 9.0/10.0 227 KB); the factory prefers the value torch reports for the device.
"""

from .._torch_cuda_like import GiB, KiB, DeviceSpec

_A100 = "NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf)"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (SXM 3.35 TB/s, PCIe 2 TB/s, NVL 3.9 TB/s)"


def _nv(name, arch, gib, gbps, smem_kib, match, source):
    return DeviceSpec(name, arch, gib * GiB, gbps, 32, smem_kib * KiB, match, source)


NVIDIA = (
    _nv("NVIDIA A100 40GB", "sm_80", 40, 1555, 163, ("A100 40GB",), _A100),
    _nv("NVIDIA A100 80GB SXM", "sm_80", 80, 2039, 163, ("A100 SXM4 80GB", "A100 SXM 80GB"), _A100),
    _nv("NVIDIA A100 80GB PCIe", "sm_80", 80, 1935, 163, ("A100 80GB PCIE",), _A100),
    _nv("NVIDIA A10", "sm_86", 24, 600, 99, ("A10",), "NVIDIA A10 datasheet"),
    _nv("NVIDIA A40", "sm_86", 48, 696, 99, ("A40",), "NVIDIA A40 datasheet"),
    _nv("NVIDIA RTX A6000", "sm_86", 48, 768, 99, ("RTX A6000",), "NVIDIA RTX A6000 datasheet"),
    _nv("NVIDIA GeForce RTX 3090", "sm_86", 24, 936, 99, ("RTX 3090",), "NVIDIA RTX 3090 spec page"),
    _nv("NVIDIA L40S", "sm_89", 48, 864, 99, ("L40S",), "NVIDIA L40S datasheet"),
    _nv("NVIDIA L40", "sm_89", 48, 864, 99, ("L40",), "NVIDIA L40 datasheet"),
    _nv("NVIDIA L4", "sm_89", 24, 300, 99, ("L4",), "NVIDIA L4 datasheet"),
    _nv("NVIDIA GeForce RTX 4090", "sm_89", 24, 1008, 99, ("RTX 4090",), "NVIDIA RTX 4090 spec page"),
    # torch/NVML names: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL"
    _nv("NVIDIA H100 SXM", "sm_90", 80, 3350, 227, ("H100 HBM3", "H100 SXM"), _H100),
    _nv("NVIDIA H100 PCIe", "sm_90", 80, 2000, 227, ("H100 PCIE",), _H100),
    _nv("NVIDIA H100 NVL", "sm_90", 94, 3900, 227, ("H100 NVL",), _H100),
    _nv("NVIDIA H200", "sm_90", 141, 4800, 227, ("H200",), "NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s)"),
    _nv("NVIDIA H20", "sm_90", 96, 4000, 227, ("H20",), "NVIDIA H20 product brief (96 GB HBM3, 4.0 TB/s)"),
    # Not checked against an NVIDIA datasheet: docs.vultr.com inference-cookbook (HGX B200:
    # sm_100, 179 GB visible, 8.0 TB/s); glennklockwood.com/garden/processors/B200 (8 TB/s).
    _nv("NVIDIA B200", "sm_100", 180, 8000, 227, ("B200",), "secondary sources, verify"),
)
