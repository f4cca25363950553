"""backends/cpu's C sources compile with each instruction set's branch (portable C, AVX2 + FMA,
AVX-512, AVX-512 BF16), so a branch this machine cannot run still builds in CI; the builds this
CPU can run report the ISA their flags select."""

import ctypes
import subprocess

import pytest

from ernie_hal.backends.cpu import native

CC = native._compiler()
# (flags, the ISA the build reports, the /proc/cpuinfo flags needed to load and call it)
ISA_BUILDS = [
    ((), "portable C", ()),
    (("-mavx2", "-mfma", "-mf16c"), "AVX2", ("avx2", "fma", "f16c")),
    (("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"), "AVX-512", ("avx512f", "avx512bw", "avx512vl")),
    (("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mavx512vl", "-mfma"), "AVX-512 BF16",
     ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")),
]


@pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang; or set CC)")
@pytest.mark.parametrize("flags,isa,cpu_needs", ISA_BUILDS, ids=[b[1] for b in ISA_BUILDS])
def test_kernel_sources_compile_for_each_isa(tmp_path, flags, isa, cpu_needs):
    out = tmp_path / "kernels.so"
    run = subprocess.run([CC, *native.FLAGS, *flags, "-o", str(out), *native.SOURCES, "-lm"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    have = set(native._cpu_flags().split())
    if not set(cpu_needs) <= have:
        return                                     # built; this CPU cannot run it
    lib = ctypes.CDLL(str(out))
    lib.ernie_gemv_isa.restype = lib.ernie_qgemv_isa.restype = lib.ernie_qgemv_a8_isa.restype = ctypes.c_int
    assert native.ISA_NAMES[lib.ernie_gemv_isa()] == isa and native.ISA_NAMES[lib.ernie_qgemv_isa()] == isa
    # the int8-activation kernel has AVX2 loops only: every AVX2 or AVX-512 build runs them
    assert native.ISA_NAMES[lib.ernie_qgemv_a8_isa()] == ("portable C" if isa == "portable C" else "AVX2")
