"""Is Iluvatar CoreX (IXUCA) usable here? A pure function of a Snapshot, plus probe().

CoreX ships its own PyTorch that keeps the torch.cuda API; its version carries a
"+corex" tag (see _torch_cuda_like.torch_build). ixML, CoreX's NVML twin, answers names
and memory without creating a context.
"""

from ...core.plugins.backend import ProbeResult
from .._torch_cuda_like import Snapshot, probe_snapshot, read_nvml_like, take_snapshot
from .devices import ILUVATAR

VISIBLE_VARS = ("CUDA_VISIBLE_DEVICES",)
# Absolute paths only: "libixml.so" is also the name of libupnp's XML parser on many
# systems. Paths from Syllo/nvtop src/extract_gpuinfo_ixml.c and Iluvatar's ix-exporter.
IXML_PATHS = ("/usr/local/corex/lib64/libixml.so", "/usr/local/corex/lib/libixml.so")


def read_ixml():
    return read_nvml_like(IXML_PATHS)


def is_iluvatar(snap: Snapshot) -> bool:
    """The CoreX build, or a CUDA-looking torch whose devices ixML names as Iluvatar's."""
    named = any(d.name.startswith("Iluvatar") for d in snap.devices)
    return snap.build == "corex" or (snap.build == "cuda" and named)


def build_reason(snap: Snapshot) -> str:
    if is_iluvatar(snap):
        return ""
    return f"no Iluvatar CoreX runtime found (torch is not the CoreX build: torch {snap.torch_version})"


def probe_from(snap: Snapshot) -> ProbeResult:
    # ixML's compute capability (7.1) is not an arch name: match the table by name only
    return probe_snapshot(snap, "ixuca", ILUVATAR, build_reason(snap), "CoreX torch",
                          "no Iluvatar driver or device found; check `ixsmi`", use_arch=False)


def probe() -> ProbeResult:
    return probe_from(take_snapshot(read_ixml, "ixml", builds=("corex", "cuda"), visible_vars=VISIBLE_VARS))
