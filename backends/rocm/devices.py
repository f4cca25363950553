"""AMD Instinct devices by gfx target: memory, bandwidth, wavefront and LDS, as data.

Arch, VRAM, wavefront 64 and LDS per CU: ROCm docs "AMD GPU specifications"
(rocm.docs.amd.com/en/latest/reference/gpu-specs.html: MI355X/MI350X gfx950 288 GiB LDS
160 KiB; MI325X gfx942 256 GiB LDS 64 KiB). Bandwidth: AMD product pages, as in
the vendors' datasheets (MI300X 5.3, MI325X 6.0 TB/s also in docs.vultr.com's ROCm
hardware-requirements page; MI355X 8.0 TB/s). One torch device of an MI250X is one GCD:
half the package's 128 GB and 3.2 TB/s.
"""

from .._torch_cuda_like import GiB, KiB, DeviceSpec

_SPECS = "ROCm gpu-specs table + AMD product page"


def _amd(name, arch, gib, gbps, lds_kib, match, source=_SPECS):
    return DeviceSpec(name, arch, gib * GiB, gbps, 64, lds_kib * KiB, match, source)


AMD = (
    # MI300X VMs report "AMD Instinct MI300X VF" (vLLM rocm.py maps PCI id 0x74b5 to MI300X);
    # MI325X shares gfx942 and is told apart by name or by its 256 GB of HBM3E.
    _amd("AMD Instinct MI300X", "gfx942", 192, 5300, 64, ("MI300X",)),
    _amd("AMD Instinct MI325X", "gfx942", 256, 6000, 64, ("MI325X",)),
    _amd("AMD Instinct MI300A", "gfx942", 128, 5300, 64, ("MI300A",), "AMD MI300A data sheet (unified HBM3)"),
    # gfx950: MI355X first so a nameless gfx950 with 288 GB reads as the MI355X
    _amd("AMD Instinct MI355X", "gfx950", 288, 8000, 160, ("MI355X",)),
    _amd("AMD Instinct MI350X", "gfx950", 288, 8000, 160, ("MI350X",)),
    _amd("AMD Instinct MI250X (one GCD)", "gfx90a", 64, 1638, 64, ("MI250X", "MI250")),
    _amd("AMD Instinct MI210", "gfx90a", 64, 1638, 64, ("MI210",)),
)
