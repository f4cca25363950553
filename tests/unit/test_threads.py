"""core/runtime/threads.py: the calling thread's idle OpenMP workers are released (so the engine
thread's team is the only one libgomp manages), and the next parallel region still works."""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import os, torch
from ernie_hal.core.runtime.threads import _loaded_libgomp, release_openmp_pool
count = lambda: len(os.listdir("/proc/self/task"))
x = torch.randn(4_000_000)
(x.exp() * 2).sum()                     # a parallel region: this thread's pool exists
before = count()
done = release_openmp_pool()
after = count()
again = float((x.exp() * 2).sum())      # a new pool, the same answer
print(_loaded_libgomp() is not None, done, before, after, again == float((x.exp() * 2).sum()))
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.exists("/proc/self/task"),
                    reason="needs 2+ torch threads and /proc")
def test_release_openmp_pool_frees_the_idle_workers_of_the_calling_thread():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=100,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    has_gomp, done, before, after, same = out.stdout.split()
    if has_gomp != "True":
        pytest.skip("this torch does not run libgomp")
    assert done == "True" and int(after) < int(before) and same == "True"
