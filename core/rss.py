"""The process's resident memory: its peak, for load reports, budgets and benchmarks, and giving
freed heap pages back to the system during a load."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark. Linux's VmHWM starts afresh at exec; ru_maxrss does
    not (a child exec'd from a large parent starts at the parent's peak), so it is the fallback
    only where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):    # not glibc (musl, macOS): nothing to call
        return None


def release_free_heap() -> None:
    """Return the free pages inside the C heap to the system (glibc's malloc_trim). A load that
    allocates and frees many mid-sized temporaries (quantizing a block, a kernel's layout
    conversion) between the weights it keeps leaves holes the allocator keeps resident; called
    once per layer they never add up to more than one layer's worth. A no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
