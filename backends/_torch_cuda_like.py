"""What the three CUDA-like backends (cuda, rocm, ixuca) share.

ROCm and Iluvatar CoreX builds of PyTorch keep the `torch.cuda` API and the "cuda" device
type, so one Backend subclass serves all three; they differ in probing and device tables.

Probing is split in two so tests can fake any machine:
  `take_snapshot()` reads torch's build fields and asks a management library (NVML, amdsmi,
  ixML) for names and memory; it never creates a device context and never writes os.environ.
  Each backend's `probe_from(snapshot)` is a pure function of that snapshot.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..core.plugins.backend import Backend, Capabilities, DeviceInfo, ProbeResult

GiB = 1024 ** 3
KiB = 1024


# ---- environment snapshot ------------------------------------------------------------------
@dataclass(frozen=True)
class GpuFacts:
    """One visible device as a management library reports it; empty fields are unknown."""
    name: str = ""
    memory_total: int = 0
    memory_free: int = 0
    arch: str = ""                # "sm_90", "gfx942"; "" when the library does not say


@dataclass(frozen=True)
class Snapshot:
    torch_version: str            # torch.__version__, e.g. "2.13.0+cpu", "2.7.1+corex.4.4.0"
    cuda: str | None = None       # torch.version.cuda
    hip: str | None = None        # torch.version.hip
    device_count: int = 0         # torch.cuda.device_count(): NVML/amdsmi based, no context
    devices: tuple = ()           # GpuFacts per visible device, when a management lib answered
    source: str = ""              # which library filled `devices` ("nvml", "amdsmi", "ixml")
    visible: tuple = ()           # ((VAR, value), ...) for the *_VISIBLE_DEVICES that are set
    count_error: str = ""         # why device_count() failed, if it did

    @property
    def build(self) -> str:
        return torch_build(self.torch_version, self.cuda, self.hip)

    def visible_note(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.visible)


def torch_build(version: str, cuda: str | None, hip: str | None) -> str:
    """"cpu" | "cuda" | "hip" | "corex": which runtime this torch was built for.

    ROCm: torch.version.hip is a string, None on CUDA builds (PyTorch docs, "HIP (ROCm)
    semantics"). CoreX: Iluvatar's wheels carry a "+corex" local version, e.g.
    "2.10.0+corex.4.5.0.20260419" (Deep-Spark/DeepSparkInference
    models/speech/speech_synthesis/cosyvoice/igie/cv3-eval/pip3.txt) and report
    torch.version.cuda "10.2" (NCIC-AlphaSparse/FlagSparse Iluvatar debug notes), so the
    marker must be checked before the CUDA field.
    """
    if hip:
        return "hip"
    if "corex" in (version or "").lower():
        return "corex"
    return "cuda" if cuda else "cpu"


def visible_env(names: tuple) -> tuple:
    return tuple((n, os.environ[n]) for n in names if n in os.environ)  # read, never write


def take_snapshot(reader: Callable[[], tuple | None] | None = None, source: str = "",
                  builds: tuple = (), visible_vars: tuple = ("CUDA_VISIBLE_DEVICES",)) -> Snapshot:
    """The real snapshot. `reader` (a management-library query) runs only for `builds`."""
    snap = Snapshot(torch_version=str(torch.__version__), cuda=torch.version.cuda,
                    hip=getattr(torch.version, "hip", None), visible=visible_env(visible_vars))
    if snap.build == "cpu":
        return snap
    try:
        count = int(torch.cuda.device_count())  # uses NVML/amdsmi when it can: no context
    except Exception as e:  # a broken driver must read as "unavailable", not crash probing
        return replace(snap, count_error=f"{type(e).__name__}: {e}")
    devices = ()
    if reader is not None and snap.build in builds:
        try:
            physical = reader() or ()
        except Exception:  # management libraries are optional extras
            physical = ()
        devices = visible_subset(tuple(physical), snap.visible)
    return replace(snap, device_count=count, devices=devices, source=source if devices else "")


def visible_subset(physical: tuple, visible: tuple) -> tuple:
    """Map physical-order facts to visible order; () when the mapping is not plain indices.

    Management libraries ignore *_VISIBLE_DEVICES (vLLM rocm.py says the same of NVML and
    amdsmi). Facts are hints for listings; the factory reads the real properties.
    """
    devices = physical
    names = {var for var, _ in visible}
    for var, value in visible:
        if var == "CUDA_VISIBLE_DEVICES" and "HIP_VISIBLE_DEVICES" in names:
            continue  # HIP reads one or the other, never both in turn
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not all(p.isdigit() for p in parts):
            return ()  # UUIDs or MIG names: no safe mapping
        devices = tuple(devices[int(p)] for p in parts if int(p) < len(devices))
    return devices


# ---- management libraries ------------------------------------------------------------------
class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


def read_nvml_like(paths: tuple) -> tuple | None:
    """Names/memory through an NVML-compatible C library (NVIDIA NVML or Iluvatar ixML).

    ixML exports the NVML symbols (nvmlInit_v2, nvmlDeviceGetCount_v2, ...): Syllo/nvtop
    src/extract_gpuinfo_ixml.c; gpustack/runtime gpustack_runtime/detector/iluvatar.py.
    """
    lib = None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError:
            continue
    if lib is None:
        return None

    def fn(*names):
        for n in names:
            f = getattr(lib, n, None)
            if f is not None:
                return f
        return None

    init, shutdown = fn("nvmlInit_v2", "nvmlInit"), fn("nvmlShutdown")
    count_fn = fn("nvmlDeviceGetCount_v2", "nvmlDeviceGetCount")
    handle_fn = fn("nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetHandleByIndex")
    name_fn, mem_fn = fn("nvmlDeviceGetName"), fn("nvmlDeviceGetMemoryInfo")
    cc_fn = fn("nvmlDeviceGetCudaComputeCapability")
    if None in (init, shutdown, count_fn, handle_fn) or init() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if count_fn(ctypes.byref(count)) != 0:
            return None
        out = []
        for i in range(count.value):
            h = ctypes.c_void_p()
            if handle_fn(ctypes.c_uint(i), ctypes.byref(h)) != 0:
                out.append(GpuFacts())
                continue
            buf = ctypes.create_string_buffer(96)
            name_ok = name_fn is not None and name_fn(h, buf, ctypes.c_uint(96)) == 0
            name = buf.value.decode(errors="replace") if name_ok else ""
            mem = _NvmlMemory()
            mem_ok = mem_fn is not None and mem_fn(h, ctypes.byref(mem)) == 0
            major, minor = ctypes.c_int(), ctypes.c_int()
            cc_ok = cc_fn is not None and cc_fn(h, ctypes.byref(major), ctypes.byref(minor)) == 0
            out.append(GpuFacts(name, mem.total if mem_ok else 0, mem.free if mem_ok else 0,
                                f"sm_{major.value}{minor.value}" if cc_ok else ""))
        return tuple(out)
    finally:
        shutdown()


# ---- device tables -------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    name: str
    arch: str
    memory: int                   # bytes (datasheet capacity)
    bandwidth_gbps: float         # datasheet memory bandwidth, GB/s; 0 when unknown
    warp_size: int
    shared_memory: int            # bytes a block can use (NVIDIA opt-in) / LDS per CU (AMD)
    match: tuple = ()             # name patterns, each "TOKEN TOKEN": all tokens in the name
    source: str = ""


def _tokens(name: str) -> set:
    return {t for t in re.split(r"[^A-Z0-9]+", (name or "").upper()) if t}


def lookup(table: tuple, arch: str = "", name: str = "", memory: int = 0) -> DeviceSpec | None:
    """Best entry: same arch, then the longest name pattern, then the nearest memory size.

    Tokens, not substrings, so "H20" does not match "NVIDIA H200". Without an arch only a
    name match counts; an arch missing from the table gives None (callers use generic data).
    """
    cands = [s for s in table if s.arch == arch] if arch else list(table)
    toks = _tokens(name)
    best, score = None, 0
    for s in cands:
        for pattern in s.match:
            need = _tokens(pattern)
            if need <= toks and len(need) > score:
                best, score = s, len(need)
    if best is not None or not arch or not cands:
        return best
    if memory:
        return min(cands, key=lambda s: abs(s.memory - memory))
    return cands[0]


def listed_devices(backend: str, snap: Snapshot, table: tuple, use_arch: bool = True) -> tuple:
    """Probe-time DeviceInfo per visible device: what the management library and table know."""
    facts = snap.devices if len(snap.devices) == snap.device_count else (GpuFacts(),) * snap.device_count
    out = []
    for i, f in enumerate(facts):
        f = f if use_arch else replace(f, arch="")
        spec = lookup(table, f.arch, f.name, f.memory_total) if (f.arch or f.name) else None
        out.append(device_info(backend, i, f, spec))
    return tuple(out)


def probe_snapshot(snap: Snapshot, backend: str, table: tuple, build_reason: str, runtime: str,
                   no_device_hint: str, use_arch: bool = True) -> ProbeResult:
    """The probe every CUDA-like backend runs: right torch build, devices counted, listed."""
    if build_reason:
        return ProbeResult(False, build_reason)
    if snap.count_error:
        return ProbeResult(False, f"{runtime} present but counting devices failed: {snap.count_error}")
    if snap.device_count == 0:
        return ProbeResult(False, f"{runtime} present but no GPU visible ({snap.visible_note() or no_device_hint})")
    return ProbeResult(True, devices=listed_devices(backend, snap, table, use_arch=use_arch))


def device_info(backend: str, index: int, facts: GpuFacts, spec: DeviceSpec | None) -> DeviceInfo:
    return DeviceInfo(backend=backend, index=index,
                      name=facts.name or (spec.name if spec else "unknown (open it for details)"),
                      arch=facts.arch or (spec.arch if spec else "unknown"),
                      memory_total=facts.memory_total or (spec.memory if spec else 0),
                      memory_free=facts.memory_free,
                      bandwidth_gbps=spec.bandwidth_gbps if spec else 0.0,
                      torch_device=f"cuda:{index}")


# ---- the factory side: read the chosen device (allowed to initialise the runtime) -----------
@dataclass(frozen=True)
class DeviceProps:
    name: str
    major: int
    minor: int
    total_memory: int
    free_memory: int
    gcn_arch: str = ""             # ROCm only: "gfx942:sramecc+:xnack-"
    warp_size: int = 0             # 0 when this torch does not expose it
    shared_memory_optin: int = 0   # NVIDIA only (HIP lacks it: torch/cuda/_utils.py)
    shared_memory_per_block: int = 0
    multi_processor_count: int = 0


def read_props(index: int, backend: str) -> DeviceProps:
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"{backend}:{index} does not exist; {count} device(s) visible")
    p = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return DeviceProps(name=str(p.name), major=int(p.major), minor=int(p.minor),
                       total_memory=int(getattr(p, "total_memory", 0) or total),
                       free_memory=int(free),
                       gcn_arch=str(getattr(p, "gcnArchName", "") or ""),
                       warp_size=int(getattr(p, "warp_size", 0) or 0),
                       shared_memory_optin=int(getattr(p, "shared_memory_per_block_optin", 0) or 0),
                       shared_memory_per_block=int(getattr(p, "shared_memory_per_block", 0) or 0),
                       multi_processor_count=int(getattr(p, "multi_processor_count", 0) or 0))


def bound(backend: "CudaLikeBackend") -> "CudaLikeBackend":
    """A factory's backend, made current on the calling thread (cuda:N with N != 0 otherwise
    runs Triton launches and graph capture on device 0)."""
    backend.bind_thread()
    return backend


def require_build(expected: tuple, reason: Callable[[Snapshot], str]) -> str:
    """Factories refuse a torch built for another runtime (ROCm torch also has torch.cuda)."""
    snap = Snapshot(str(torch.__version__), torch.version.cuda, getattr(torch.version, "hip", None))
    if snap.build not in expected:
        raise RuntimeError(reason(snap))
    return snap.build


@functools.lru_cache(maxsize=1)
def triton_version() -> str | None:
    """Triton's version when it imports (only called once a GPU backend is chosen)."""
    try:
        import triton
    except Exception:
        return None
    return str(getattr(triton, "__version__", "") or "unknown")


def make_caps(props: DeviceProps, spec: DeviceSpec | None, *, dtypes: tuple, graphs: bool,
              triton: bool, default_warp: int) -> Capabilities:
    """Properties first, then the table, then the vendor default."""
    smem = props.shared_memory_optin or (spec.shared_memory if spec else 0) or props.shared_memory_per_block
    return Capabilities(dtypes=dtypes, pinned_host_memory=True, async_copy=True, streams=True,
                        graphs=graphs, warp_size=props.warp_size or (spec.warp_size if spec else default_warp),
                        max_shared_memory=smem, compute_units=props.multi_processor_count, triton=triton,
                        collectives=_collectives())


def make_info(backend: str, index: int, props: DeviceProps, arch: str, spec: DeviceSpec | None) -> DeviceInfo:
    name = props.name or (spec.name if spec else "unknown")
    return DeviceInfo(backend=backend, index=index, name=name, arch=arch,
                      memory_total=props.total_memory, memory_free=props.free_memory,
                      bandwidth_gbps=spec.bandwidth_gbps if spec else 0.0, torch_device=f"cuda:{index}")


# ---- memory verbs --------------------------------------------------------------------------
class CudaLikeBackend(Backend):
    """Memory verbs over torch.cuda; the same calls drive CUDA, HIP and CoreX builds.

    Copies are non-blocking; ordering across streams is the caller's (record/wait events).
    """

    def _alloc(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _pinned_alloc(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _copy(self, dst, src, stream):
        if stream is None:
            dst.copy_(src, non_blocking=True)
            return
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        for t in (dst, src):  # keep the caching allocator from reusing them under the copy
            if t.is_cuda:
                t.record_stream(stream)

    def _new_stream(self):
        return torch.cuda.Stream(device=self.device)

    def _record_event(self, stream):
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def _wait_event(self, event, stream):
        (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(event)

    def _synchronize(self):
        torch.cuda.synchronize(self.device)

    def _capture_graph(self, fn, pool):
        # Warm up on a side stream first (lazy cuBLAS/Triton initialisation must not land in
        # the graph), then capture into the caller's pool (one per set of graphs: capturing
        # into a pool whose graphs were freed trips the caching allocator's asserts), the
        # recipe of PyTorch's CUDA-graphs notes, which holds on ROCm's hipGraph too.
        device = self.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph.replay, out

    def _graph_pool(self):
        return torch.cuda.graph_pool_handle()

    def _bind_thread(self):
        torch.cuda.set_device(self.device)

    def _pinned_footprint(self, nbytes):
        # PyTorch's CachingHostAllocator rounds every pinned block up to a power of two
        # (c10/core/CachingHostAllocator.h: "Round up the allocation to the nearest power of two")
        return 1 << max(0, int(nbytes) - 1).bit_length() if nbytes > 0 else 0

    def _timing_event(self, stream):
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def _elapsed_seconds(self, start, end):
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def _device_free(self):
        free, _total = torch.cuda.mem_get_info(self.device)
        # memory torch has cached but not handed out is free to us too
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(free + max(0, cached))


def _collectives() -> str:
    """NCCL where this torch has it (RCCL answers the same API on ROCm), else gloo."""
    import torch.distributed as dist
    return "nccl" if dist.is_available() and dist.is_nccl_available() else "gloo"
