"""Is AMD ROCm usable here? A pure function of a Snapshot, plus the real probe().

ROCm PyTorch keeps the "cuda" device type; what marks it is torch.version.hip being a
string (None on CUDA builds): PyTorch docs "HIP (ROCm) semantics".
"""

from ...core.plugins.backend import ProbeResult
from .._torch_cuda_like import GpuFacts, Snapshot, probe_snapshot, take_snapshot
from .devices import AMD

# ROCR filters first, then HIP (which also honours CUDA_VISIBLE_DEVICES): HARDWARE.md
VISIBLE_VARS = ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


def build_reason(snap: Snapshot) -> str:
    v = snap.torch_version
    if snap.build == "hip":
        return ""
    hint = {"cuda": " — this is a CUDA build, use --device cuda",
            "corex": " — this is Iluvatar's CoreX build, use --device ixuca"}.get(snap.build, "")
    return f"torch built without HIP (install a ROCm build of PyTorch; found torch {v}){hint}"


def probe_from(snap: Snapshot) -> ProbeResult:
    return probe_snapshot(snap, "rocm", AMD, build_reason(snap), "ROCm torch",
                          "no amdgpu driver or /dev/kfd access")


def read_amdsmi() -> tuple | None:
    """AMD devices through `amdsmi`: the call vLLM uses because it does not initialise HIP
    (ROCm/vllm vllm/platforms/rocm.py; ROCm/amdsmi py-interface/README.md)."""
    try:
        import amdsmi
    except ImportError:
        return None
    amdsmi.amdsmi_init()
    try:
        out = []
        for h in amdsmi.amdsmi_get_processor_handles():
            asic = amdsmi.amdsmi_get_gpu_asic_info(h) or {}
            name = str(asic.get("market_name") or "")   # "AMD Instinct MI300X VF" in VMs
            arch = str(asic.get("target_graphics_version") or "").split(":")[0].lower()
            vram = amdsmi.AmdSmiMemoryType.VRAM
            try:
                total = int(amdsmi.amdsmi_get_gpu_memory_total(h, vram))
                free = total - int(amdsmi.amdsmi_get_gpu_memory_usage(h, vram))
            except Exception:
                total = free = 0
            out.append(GpuFacts("" if name == "N/A" else name, total, max(0, free),
                                arch if arch.startswith("gfx") else ""))
        return tuple(out)
    finally:
        amdsmi.amdsmi_shut_down()


def probe() -> ProbeResult:
    return probe_from(take_snapshot(read_amdsmi, "amdsmi", builds=("hip",), visible_vars=VISIBLE_VARS))
