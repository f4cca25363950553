"""Prefill-sized GEMMs on CPUs without bf16 arithmetic.

Where AVX2 is the widest vector unit, prefill runs the project's own GEMM (gemm.c): it widens bf16
and dequantizes wint8/wint4 weights a block at a time in L2 and ran 1.0-2x torch's fp32 GEMM (MKL) on
the 0.3B projections here, bf16 widening included. Elsewhere (AVX-512 builds, no compiler):

torch's bf16 GEMM is fast where the CPU multiplies bf16 (AVX512-BF16, AMX-BF16: oneDNN) and slow
where it does not: on an AVX2-only Zen3 here, 0.3B prefill ran 27 tok/s in bf16 against 112-143
in fp32. There the bf16 weights are widened to fp32 a row chunk at a time (bounded scratch), the
GEMM runs in fp32 and the result is rounded to bf16 once: bf16 inputs are exact in fp32 and torch's
bf16 GEMM accumulates in fp32 and rounds once too, so the values differ only by summation order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CHUNK_BYTES = 16 << 20          # fp32 weight rows widened per GEMM
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")   # x86 cpuinfo flags; "bf16": Arm's FEAT_BF16


@functools.lru_cache(maxsize=1)
def bf16_gemm_is_native(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Does this CPU multiply bf16 (so torch's bf16 GEMM runs at speed)? Unknown counts as yes:
    the upcast path is for CPUs known to lack it."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            line = next((l for l in f if l.startswith(("flags", "Features"))), None)
    except OSError:
        return True
    if line is None:
        return True
    flags = line.split(":", 1)[1].split()
    return any(f in flags for f in BF16_CPU_FLAGS)


W_KIND = {torch.float32: 0, torch.bfloat16: 1}     # gemm.c's weight kinds; wint4 is 4, wint8 8


def native_gemm_wins(native) -> bool:
    """Does gemm.c beat torch's GEMM here? Measured where AVX2 is the widest vector unit; with
    AVX-512 torch's GEMMs (16 lanes, or bf16 arithmetic) keep prefill."""
    return native is not None and native.gemm_isa == "AVX2" and native.isa == "AVX2"


def native_gemm(native, x: torch.Tensor, w: torch.Tensor, N: int, kind: int | None = None,
                scales: torch.Tensor | None = None, round_bf16: bool = False) -> torch.Tensor:
    """x [M, K] (bf16 or fp32, unit column stride) times the N weight rows w holds (w [N, K] fp32 or
    bf16, or packed wint8/wint4 bytes with scales [N, G]) -> [M, N] in x.dtype, through gemm.c.
    round_bf16: dequantized weights rounded to bf16 first, as the reference casts them."""
    M, K = x.shape
    y = torch.empty(M, N, dtype=x.dtype)
    kind = W_KIND[w.dtype] if kind is None else kind
    G = 0 if scales is None else scales.shape[-1]
    if native.gemm(kind, x.data_ptr(), x.dtype == torch.bfloat16, x.stride(0), w.data_ptr(),
                   None if scales is None else scales.data_ptr(), G, round_bf16, y.data_ptr(),
                   y.dtype == torch.bfloat16, N, M, N, K, torch.get_num_threads()):
        raise MemoryError(f"gemm: no memory to pack {M} x {K} activations")
    return y


def widened_rows(w: torch.Tensor) -> int:
    """Weight rows per fp32 chunk."""
    return max(16, CHUNK_BYTES // (4 * w.shape[-1]))


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for bf16 x [..., K] and w [N, K] computed in fp32, rounded to bf16 once."""
    K = x.shape[-1]
    x32 = x.reshape(-1, K).float()
    N = w.shape[0]
    rows = widened_rows(w)
    if N <= rows:
        y = F.linear(x32, w.float()).to(x.dtype)
    else:
        y = torch.empty(x32.shape[0], N, dtype=x.dtype)
        for n0 in range(0, N, rows):
            y[:, n0:n0 + rows] = F.linear(x32, w[n0:n0 + rows].float())   # the copy rounds to bf16
    return y.view(*x.shape[:-1], N)
