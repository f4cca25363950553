"""The CPU kernels (gemv.c: bf16/fp32 GEMV; qgemv.c: wint8/wint4; qgemv_a8.c: the same on int8
activations; gemm.c: the prefill GEMM for every weight kind; norm.c; attention.c), built once with
the system C compiler and loaded with ctypes.

Built on first use into the ernie-hal cache (keyed by the source, compiler and CPU flags, so an
upgrade or another machine rebuilds), then reused: a load costs a dlopen. Where no compiler
exists, the build fails, or ERNIE_HAL_CPU_NATIVE=0, `library()` returns None with the reason and
the CPU backend binds torch's kernels instead. The .so links libgomp by soname: torch has loaded
its own already, so the dynamic linker hands the kernel torch's OpenMP pool (one set of
threads, sized by torch.set_num_threads). ERNIE_HAL_CPU_NATIVE=portable builds without
-march=native: the portable C loops a machine without AVX2 or AVX-512 runs (the tests check them).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch  # noqa: F401 - loads torch's libgomp before the kernel library asks for it

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(HERE, f) for f in ("gemv.c", "qgemv.c", "qgemv_a8.c", "gemm.c", "norm.c", "attention.c"))
HEADERS = tuple(os.path.join(HERE, f) for f in ("cpu_common.h", "gemv_avx2.h", "qgemv_avx2.h"))
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")
NATIVE_ISA = ("-march=native",)   # dropped by ERNIE_HAL_CPU_NATIVE=portable: the plain C loops (tests)
ISA_NAMES = {0: "portable C", 1: "AVX2", 2: "AVX-512", 3: "AVX-512 BF16"}   # ernie_gemv_isa / ernie_qgemv_isa


class NativeGemv:
    """The loaded library: `bf16` and `f32` GEMVs, the quantized `qgemv` and `qdequant`
    (qgemv.c), `qgemv_a8` on int8 activations (qgemv_a8.c), the prefill `gemm` (gemm.c), the
    decode `add_rms_norm` (norm.c), `rope_kv_write` and `decode_attention` (attention.c), and
    which inner loops each has."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        sig = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
               ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        self.bf16, self.f32 = lib.ernie_gemv_bf16, lib.ernie_gemv_f32
        for fn in (self.bf16, self.f32):
            fn.argtypes, fn.restype = sig, None
        i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self.qgemv, self.qdequant = lib.ernie_qgemv, lib.ernie_qdequant
        self.qgemv.argtypes = [i32, vp, i32, i64, vp, vp, i64, vp, i64, i64, i64, i64, i32]
        self.qgemv.restype = i32
        self.qdequant.argtypes = [i32, vp, vp, i64, vp, i32, i64, i64, i64, i32]
        self.qdequant.restype = None
        self.qgemv_a8 = lib.ernie_qgemv_a8
        self.qgemv_a8.argtypes, self.qgemv_a8.restype = self.qgemv.argtypes, i32
        self.qgemv_a8_supported = lib.ernie_qgemv_a8_supported
        self.qgemv_a8_supported.argtypes, self.qgemv_a8_supported.restype = [i32, i64, i64], i32
        self.gemm = lib.ernie_gemm
        self.gemm.argtypes = [i32, vp, i32, i64, vp, vp, i64, i32, vp, i32, i64, i64, i64, i64, i32]
        self.gemm.restype = i32
        self.add_rms_norm = lib.ernie_add_rms_norm
        self.add_rms_norm.argtypes = [vp, vp, vp, vp, vp, i64, i64, ctypes.c_float, i32]
        self.add_rms_norm.restype = None
        self.rope_kv_write = lib.ernie_rope_kv_write
        self.rope_kv_write.argtypes = [vp, i64, vp, i64, vp, i64, vp, vp, vp, i64, vp, vp, vp, vp, i64, i64, i64, i64,
                                       i32, i32]
        self.rope_kv_write.restype = i32
        self.decode_attention = lib.ernie_decode_attention
        self.decode_attention.argtypes = [vp, i64, vp, vp, vp, i64, vp, vp, i64, i64, i64, i64, i64,
                                          ctypes.c_float, i32, i32]
        self.decode_attention.restype = i32
        for isa in (lib.ernie_gemv_isa, lib.ernie_qgemv_isa, lib.ernie_qgemv_a8_isa, lib.ernie_gemm_isa):
            isa.restype = ctypes.c_int
        self.isa = ISA_NAMES.get(lib.ernie_gemv_isa(), "?")
        self.qisa = ISA_NAMES.get(lib.ernie_qgemv_isa(), "?")
        self.a8isa = ISA_NAMES.get(lib.ernie_qgemv_a8_isa(), "?")
        self.gemm_isa = ISA_NAMES.get(lib.ernie_gemm_isa(), "?")


def _cache_root() -> str:
    base = os.environ.get("ERNIE_HAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ernie-hal")
    return os.path.join(base, "cpu-kernels")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(cc: str, portable: bool = False) -> str:
    """Path of the built library (building it when the cache has none); raises on failure.
    portable: without -march=native, so the portable C loops run (what a machine without AVX2 gets)."""
    flags = FLAGS if portable else NATIVE_ISA + FLAGS
    src = b""
    for name in SOURCES + HEADERS:
        with open(name, "rb") as f:
            src += f.read()
    key = hashlib.sha256(src + cc.encode() + " ".join(flags).encode() + _cpu_flags().encode()).hexdigest()[:16]
    dest = os.path.join(_cache_root(), f"gemv-{key}.so")
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(dest))
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, "-o", tmp, *SOURCES, "-lm"], capture_output=True, text=True, timeout=120)
        if run.returncode:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
        os.replace(tmp, dest)        # atomic: a concurrent load sees a whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


@functools.lru_cache(maxsize=1)
def load() -> tuple:
    """(NativeGemv or None, reason when None). Built and loaded once per process."""
    mode = os.environ.get("ERNIE_HAL_CPU_NATIVE", "1").lower()
    if mode in ("0", "off", "false", "no"):
        return None, "turned off (ERNIE_HAL_CPU_NATIVE=0)"
    if platform.system() != "Linux":
        return None, f"the native GEMV is built on Linux only (this is {platform.system()})"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (cc, gcc or clang; or set CC)"
    try:
        path = build(cc, portable=mode == "portable")
        return NativeGemv(ctypes.CDLL(path), path), ""
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"native GEMV build failed: {e}"


if __name__ == "__main__":   # python -m ernie_hal.backends.cpu.native: build now and say what was built
    lib, why = load()
    print(f"native CPU GEMV: {lib.path} (bf16/fp32: {lib.isa}; wint8/wint4: {lib.qisa}; "
          f"int8 activations: {lib.a8isa}; prefill GEMM: {lib.gemm_isa})" if lib else f"native CPU GEMV unavailable: {why}")
