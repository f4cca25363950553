"""The backend contract: what a backend is (data) and the few verbs it fills in.

A backend plugin returns BackendSpecs from `ernie_hal_register_backends`. A spec's `probe`
must not create a device context nor write os.environ; its `factory` builds a Backend for
one device once the user has chosen it. Public memory verbs keep the accounts and raise
clear out-of-memory errors; backends implement the private `_verbs` (template method).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

GiB = 1024 ** 3


@dataclass(frozen=True)
class DeviceInfo:
    backend: str                  # "cpu", "cuda", "rocm", "ixuca", or a plugin's name
    index: int
    name: str                     # "NVIDIA H100 80GB HBM3", "AMD Instinct MI300X", ...
    arch: str                     # "sm_90", "gfx942", "BI-V150", "x86_64"
    memory_total: int             # bytes, 0 when unknown
    memory_free: int = 0          # bytes, 0 when unknown
    bandwidth_gbps: float = 0.0   # datasheet memory bandwidth, GB/s; 0 when unknown
    torch_device: str = "cpu"     # what torch calls it: "cuda:0" also for ROCm and CoreX

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.index}"


@dataclass(frozen=True)
class Capabilities:
    """What a device can do, as data; placement, kernels and tests ask these, never names."""
    dtypes: tuple = (torch.float32, torch.bfloat16, torch.float16)
    pinned_host_memory: bool = False
    async_copy: bool = False
    streams: bool = False
    graphs: bool = False
    warp_size: int = 1
    max_shared_memory: int = 0
    compute_units: int = 0        # SMs (NVIDIA) / CUs (AMD); 0 when unknown
    triton: bool = False          # Triton kernels can be launched on this device
    unified_memory: bool = False  # device memory is host memory (cpu, APUs): one budget covers both
    collectives: str = "gloo"     # the torch.distributed backend for this device's tensors ("nccl", ...)
    int8_activations: bool = False  # quantized linears can run on int8-quantized activations


@dataclass(frozen=True)
class ProbeResult:
    available: bool
    reason: str = ""              # why not, when unavailable ("torch built without HIP")
    devices: tuple = ()           # DeviceInfo per visible device; may carry partial facts


@dataclass(frozen=True)
class BackendSpec:
    name: str
    probe: Callable[[], ProbeResult]
    factory: Callable[[int], "Backend"]        # device index -> Backend
    aliases: tuple = ()
    priority: int = 0                          # higher wins for --device auto
    description: str = ""


class DeviceMemoryError(MemoryError):
    """An allocation that does not fit the device or the user's budget."""


@dataclass
class MemoryAccount:
    budget: int | None = None     # bytes the user allows; None = whatever the device has
    in_use: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Backend:
    """One chosen device. Subclasses set `info`, `caps` and fill in the private verbs."""

    info: DeviceInfo
    caps: Capabilities

    def __init__(self, info: DeviceInfo, caps: Capabilities, budget: int | None = None):
        self.info, self.caps = info, caps
        self.memory = MemoryAccount(budget=budget)

    @property
    def name(self) -> str:
        return self.info.backend

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.torch_device)

    def set_budget(self, budget: int | None) -> None:
        self.memory.budget = budget

    # ---- public verbs: accounting + errors ---------------------------------------------------
    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = _nbytes(shape, dtype)
        self._reserve(nbytes)
        try:
            return self._alloc(tuple(shape), dtype)
        except (RuntimeError, MemoryError) as e:
            self.release(nbytes)
            raise DeviceMemoryError(self._oom_message(nbytes, f" ({e.__class__.__name__}: {e})")) from None

    def free(self, tensor: torch.Tensor) -> None:
        self.release(tensor.numel() * tensor.element_size())
        self._free(tensor)

    def adopt(self, tensor: torch.Tensor) -> torch.Tensor:
        """Account for a tensor made elsewhere (e.g. by a kernel) that stays resident."""
        self._reserve(tensor.numel() * tensor.element_size())
        return tensor

    def release(self, nbytes: int) -> None:
        with self.memory.lock:
            self.memory.in_use = max(0, self.memory.in_use - nbytes)

    def pinned_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """Host memory the device can copy from asynchronously (plain memory where it can't)."""
        return self._pinned_alloc(tuple(shape), dtype)

    def copy_to_device(self, dst: torch.Tensor, src: torch.Tensor, stream=None) -> None:
        self._copy(dst, src, stream)

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, stream=None) -> None:
        self._copy(dst, src, stream)

    def new_stream(self):
        return self._new_stream()

    def record_event(self, stream=None):
        return self._record_event(stream)

    def wait_event(self, event, stream=None) -> None:
        """Make `stream` (None: the compute stream) wait for `event` without blocking the host."""
        if event is not None:
            self._wait_event(event, stream)

    def sync_event(self, event) -> None:
        """Block the calling host thread until `event` has happened (e.g. a pinned buffer's copy)."""
        if event is not None:
            self._sync_event(event)

    def synchronize(self) -> None:
        self._synchronize()

    def capture_graph(self, fn, pool=None):
        """Record the device work of `fn()` (a closure over tensors that keep their addresses)
        once. Returns (replay, out): `replay()` reruns the recorded work, whose result lands in
        `out`, the tensor `fn` returned. Only where `caps.graphs`; raises when capture fails
        (e.g. an op in `fn` waits for the host). `pool` (from `graph_pool()`) lets several
        graphs share memory; a pool must not outlive the graphs captured into it being freed."""
        if not self.caps.graphs:
            raise NotImplementedError(f"{self.info.label} cannot capture device graphs")
        return self._capture_graph(fn, pool)

    def graph_pool(self):
        """A fresh memory pool for a set of graphs (None: the backend's default)."""
        return self._graph_pool()

    def bind_thread(self) -> None:
        """Make this device the calling thread's current device. Every thread that launches
        work (the factory's, the engine thread, the reader threads) calls it first: runtimes
        keep the current device per thread, and device 0 is the default."""
        self._bind_thread()

    def pinned_footprint(self, nbytes: int) -> int:
        """Host bytes a `pinned_empty` of `nbytes` really takes (allocators round up)."""
        return self._pinned_footprint(int(nbytes))

    def timing_event(self, stream=None):
        """An event that can time device work on `stream`, or None (then callers use host time)."""
        return self._timing_event(stream)

    def elapsed_seconds(self, start, end) -> float:
        """Device time between two timing events (waits for `end` to have happened)."""
        return self._elapsed_seconds(start, end)

    def communicator(self, rank: int, world_size: int, group=None):
        """The collectives (all_reduce, all_gather, gather, broadcast) for this device's tensors, over an
        initialized torch.distributed process group (None: the default group)."""
        from .communicator import Communicator
        return Communicator(rank, world_size, group=group)

    def free_memory(self) -> int:
        """Bytes still available under both the device and the budget."""
        device_free = self._device_free()
        budget_left = None if self.memory.budget is None else self.memory.budget - self.memory.in_use
        candidates = [x for x in (device_free, budget_left) if x is not None]
        return max(0, min(candidates)) if candidates else 0

    def _reserve(self, nbytes: int) -> None:
        with self.memory.lock:
            budget = self.memory.budget
            if budget is not None and self.memory.in_use + nbytes > budget:
                raise DeviceMemoryError(self._oom_message(nbytes))
            self.memory.in_use += nbytes
            self.memory.peak = max(self.memory.peak, self.memory.in_use)

    def _oom_message(self, nbytes: int, detail: str = "") -> str:
        budget = self.memory.budget
        free = (budget - self.memory.in_use) if budget is not None else self._device_free()
        under = f" under a {_fmt(budget)} budget" if budget is not None else ""
        return (f"{_fmt(nbytes)} asked, {_fmt(free or 0)} free on {self.info.label}{under}{detail}; "
                f"lower --max-new-tokens/batch, use a smaller --dtype, or allow offload")

    # ---- private verbs: backends fill these in ------------------------------------------------
    def _alloc(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _free(self, tensor):
        pass  # the caching allocator returns memory when the last reference goes

    def _pinned_alloc(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, pin_memory=self.caps.pinned_host_memory)

    def _copy(self, dst, src, stream):
        dst.copy_(src, non_blocking=self.caps.async_copy)

    def _new_stream(self):
        return None

    def _record_event(self, stream):
        return None

    def _wait_event(self, event, stream):
        pass

    def _sync_event(self, event):
        event.synchronize()

    def _synchronize(self):
        pass

    def _capture_graph(self, fn, pool):
        raise NotImplementedError(f"{type(self).__name__} declares graphs but does not capture them")

    def _graph_pool(self):
        return None

    def _bind_thread(self):
        pass

    def _pinned_footprint(self, nbytes):
        return nbytes

    def _timing_event(self, stream):
        return None

    def _elapsed_seconds(self, start, end):
        return 0.0

    def _device_free(self) -> int | None:
        return self.info.memory_free or None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.label} {self.info.name} ({self.info.arch})>"


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _fmt(nbytes: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


format_bytes = _fmt
