"""Let the engine thread own the math threads: release the calling thread's OpenMP pool.

libgomp keeps a pool of worker threads per thread that ran a parallel region. The thread that
loaded the model (the server's main thread, later its event loop) holds one; the engine thread
then makes its own, and once libgomp manages more threads than there are CPUs it switches every
team to "throttled" waiting: workers sleep in the kernel at each of the hundreds of parallel
regions of a decode step instead of spinning (measured here: ~320 voluntary context switches per
token in the server's engine thread against ~60-110 for `generate` on its main thread, whose pool
is the only one). Releasing the idle pool first (OpenMP 5's omp_pause_resource_all) leaves the
engine thread's team as the one libgomp manages, as in `generate`. A pool released by mistake
costs nothing lasting: the next parallel region on that thread makes a new one.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("ernie_hal.threads")
OMP_PAUSE_HARD = 2


def _loaded_libgomp() -> str | None:
    """Path of the libgomp this process already uses (torch's), or None (another OpenMP or none):
    never load a second OpenMP runtime just to pause it."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                path = line.split()[-1]
                if "libgomp" in path.rsplit("/", 1)[-1]:
                    return path
    except OSError:
        pass
    return None


def release_openmp_pool() -> bool:
    """Free the calling thread's idle OpenMP worker threads. True when done; False where the
    process runs no libgomp or it refuses (in a parallel region, an older libgomp)."""
    path = _loaded_libgomp()
    if path is None:
        return False
    try:
        pause = ctypes.CDLL(path).omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    done = pause(OMP_PAUSE_HARD) == 0
    log.debug("released the calling thread's OpenMP pool: %s", done)
    return done
