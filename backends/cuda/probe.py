"""Is NVIDIA CUDA usable here? A pure function of a Snapshot, plus the real probe()."""

from ...core.plugins.backend import ProbeResult
from .._torch_cuda_like import GpuFacts, Snapshot, probe_snapshot, read_nvml_like, take_snapshot
from .devices import NVIDIA

VISIBLE_VARS = ("CUDA_VISIBLE_DEVICES",)


def build_reason(snap: Snapshot) -> str:
    """Why this torch cannot drive NVIDIA GPUs, or "" when it can."""
    v = snap.torch_version
    if snap.build == "cpu":
        return f"torch built without CUDA (this is a CPU build: torch {v})"
    if snap.build == "hip":  # ROCm torch also answers torch.cuda: never claim it
        return f"torch built with HIP, not CUDA — use --device rocm (torch {v})"
    if snap.build == "corex" or any(d.name.startswith("Iluvatar") for d in snap.devices):
        return f"torch is Iluvatar's CoreX build, not NVIDIA CUDA — use --device ixuca (torch {v})"
    return ""


def probe_from(snap: Snapshot) -> ProbeResult:
    return probe_snapshot(snap, "cuda", NVIDIA, build_reason(snap), f"CUDA torch (CUDA {snap.cuda})",
                          "no NVIDIA driver or device found")


def read_nvml() -> tuple | None:
    """NVIDIA devices through nvidia-ml-py (`pynvml`) when installed, else libnvidia-ml."""
    try:
        import pynvml
    except ImportError:
        return read_nvml_like(("libnvidia-ml.so.1",))
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            out.append(GpuFacts(name, int(mem.total), int(mem.free), f"sm_{major}{minor}"))
        return tuple(out)
    finally:
        pynvml.nvmlShutdown()


def probe() -> ProbeResult:
    return probe_from(take_snapshot(read_nvml, "nvml", builds=("cuda",), visible_vars=VISIBLE_VARS))
