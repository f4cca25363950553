"""The process's peak resident memory, for load reports, budgets and benchmarks."""

from __future__ import annotations

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
