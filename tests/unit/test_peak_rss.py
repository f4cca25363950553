"""peak_rss_bytes is the process's own high-water mark even when a large process exec'd it
(ru_maxrss carries the parent's peak across fork+exec; VmHWM starts afresh)."""

import subprocess
import sys

import pytest

from ernie_hal.core.api import peak_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_child_of_a_large_process_reports_its_own_peak():
    held = bytearray(800 * 2**20)
    held[::4096] = b"x" * len(held[::4096])            # touch every page: 800 MiB resident here
    assert peak_rss_bytes() > 800 * 2**20
    out = subprocess.run([sys.executable, "-c", "from ernie_hal.core.api import peak_rss_bytes; print(peak_rss_bytes())"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 700 * 2**20       # the child (torch imported) is far smaller
    del held
