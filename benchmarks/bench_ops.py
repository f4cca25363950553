"""Per-op: each kernel a backend binds versus the reference path (kernels/reference) on the same
device, at the ERNIE-4.5 shapes, in achieved GB/s and TFLOP/s, with GB/s as a share of the
device's datasheet bandwidth (its device table).

    python benchmarks/bench_ops.py --device cuda [--dtype bf16] [--ops moe gqa_attention]
    python benchmarks/bench_ops.py --device cpu --small            # works anywhere, tiny shapes
    python benchmarks/bench_ops.py --device rocm --emulate --small # the rocm binding, interpreted

Timing: warm-up, then the median of --iters runs, each bracketed by the backend's synchronize.
Bytes are the minimum an op must move (weights of the experts a batch touches, the KV it reads);
FLOPs count multiply-adds as two. Under --emulate the numbers only show that it runs.
Writes benchmarks/results/bench_ops_<backend>.json (temp file, then rename).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def shapes(small: bool) -> list:
    """(op, label, make-args factory, bytes(s), flops) at the 21B-A3B / 0.3B shapes, or tiny ones."""
    from ernie_hal.core.checks import conformance as c
    H, I, E, k, SI = (64, 32, 8, 2, 64) if small else (2560, 1536, 64, 6, 3072)   # 21B-A3B MoE
    nh, nkv, d = (4, 2, 16) if small else (20, 4, 128)
    DH, DI = (64, 96) if small else (1024, 3072)                                 # 0.3B dense MLP
    ctx = 64 if small else 4096
    Ts = (1, 16) if small else (1, 16, 2048)
    out = []
    for T in Ts:
        out.append(("rms_norm", f"T={T} H={H}", c._norm_args(T, H, False),
                    lambda s, T=T: (2 * T * H + H) * s, lambda T=T: 4 * T * H))
        out.append(("add_rms_norm", f"T={T} H={H}", c._norm_args(T, H, True),
                    lambda s, T=T: (4 * T * H + H) * s, lambda T=T: 5 * T * H))
        out.append(("rope_kv_write", f"T={T} nh={nh} nkv={nkv} d={d}",
                    c._cache_args(T, nh, nkv, d, True, blocks=max(4, -(-T // 16) + 2)),
                    lambda s, T=T: 2 * T * (nh + 2 * nkv) * d * s, lambda T=T: 6 * T * (nh + nkv) * d))
        out.append(("swiglu_mlp", f"T={T} H={DH} I={DI} (0.3B)", c._swiglu_args(T, DH, DI),
                    lambda s, T=T: (3 * DH * DI + 2 * T * DH) * s, lambda T=T: 6 * T * DH * DI))
        touched = E * (1 - (1 - k / E) ** T)          # expected distinct experts for T tokens
        out.append(("moe", f"T={T} E={E} k={k} H={H} I={I} +shared", c._moe_args(T, H, I, E, k, SI),
                    lambda s, T=T, n=touched: (n * 3 * H * I + 3 * H * SI + 2 * T * H) * s + 4 * E * H,
                    lambda T=T: 6 * T * k * H * I + 6 * T * H * SI + 2 * T * H * E))
        out.append(("linear", f"T={T} {H}->{nh * d} (q proj)", c._linear_args(T, H, nh * d),
                    lambda s, T=T: (H * nh * d + T * (H + nh * d)) * s, lambda T=T: 2 * T * H * nh * d))
    for B in (1, 16):
        out.append(("gqa_attention", f"decode B={B} ctx={ctx}",
                    c._attention_args([1] * B, [ctx] * B, nh, nkv, d),
                    lambda s, B=B: 2 * B * ctx * nkv * d * s, lambda B=B: 4 * B * nh * ctx * d))
    L = 128 if small else 2048
    out.append(("gqa_attention", f"prefill B=1 q={L}", c._attention_args([L], [L], nh, nkv, d),
                lambda s: (2 * L * nh * d + 2 * L * nkv * d) * s, lambda: 2 * nh * d * L * L))
    return out


def timed(fn, args, backend, iters: int) -> float:
    """Median seconds of fn(*args) (fresh clones of mutated caches are not needed: the ops
    overwrite the same slots each time)."""
    fn(*args)
    backend.synchronize()
    times = []
    for _ in range(iters):
        backend.synchronize()
        t = time.perf_counter()
        fn(*args)
        backend.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(args) -> dict:
    import torch

    from ernie_hal.core.checks import conformance as c
    from ernie_hal.core.plugins.emulate import emulate
    from ernie_hal.core.plugins.kernel_table import OpSpec
    from ernie_hal.core.plugins.registry import get_registry
    from ernie_hal.kernels.reference import OPS as REF

    reg = get_registry()
    backend = emulate(args.device, args.emulate_device, reg) if args.emulate else reg.pick(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    table = reg.kernel_table(backend, OpSpec(dtype=dtype, allow_fallback=True))
    impls = c.bindings(reg, backend, dtype)
    limit = backend.info.bandwidth_gbps
    size = torch.empty((), dtype=dtype).element_size()
    rows = []
    for op, label, make, nbytes, flops in shapes(args.small):
        if args.ops and op not in args.ops:
            continue
        inputs = [c._to(a, backend.device) for a in make(dtype, torch.Generator().manual_seed(0))]
        kernel = getattr(table, op)
        t_k = timed(kernel, inputs, backend, args.iters)
        t_r = timed(REF[op], inputs, backend, args.iters)
        b, f = nbytes(size), flops()
        row = {"op": op, "shape": label, "impl": impls[op], "kernel_us": t_k * 1e6, "reference_us": t_r * 1e6,
               "speedup": t_r / t_k, "kernel_gbps": b / t_k / 1e9, "kernel_tflops": f / t_k / 1e12,
               "reference_gbps": b / t_r / 1e9, "bytes": b, "flops": f,
               "bandwidth_fraction": (b / t_k / 1e9) / limit if limit else None}
        rows.append(row)
        frac = f"{100 * row['bandwidth_fraction']:5.1f}%" if limit else "   -  "
        print(f"{op:14} {label:34} {row['impl'][:24]:24} {row['kernel_us']:10.1f} us {row['reference_us']:10.1f} us "
              f"x{row['speedup']:5.2f}  {row['kernel_gbps']:8.1f} GB/s {frac}  {row['kernel_tflops']:7.3f} TFLOP/s",
              flush=True)
    return {"device": {"backend": backend.name, "name": backend.info.name, "arch": backend.info.arch,
                       "bandwidth_gbps": limit, "emulated": bool(args.emulate)},
            "dtype": DTYPES[args.dtype], "small": args.small, "iters": args.iters,
            "torch": torch.__version__, "host": platform.node(), "implementations": impls, "results": rows}


def save(data: dict, path: str) -> str:
    from ernie_hal.core.atomic import write_json
    return write_json(path, data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="backend (cuda, rocm, ixuca, cpu, auto)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--ops", nargs="+", help="only these ops")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU, or a quick check)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--emulate", action="store_true", help="bind the backend's kernels on CPU tensors under "
                                                           "the Triton interpreter (runs, does not measure)")
    ap.add_argument("--emulate-device", help="table device to emulate (e.g. MI355X)")
    ap.add_argument("--output", help="JSON path (default benchmarks/results/bench_ops_<backend>.json)")
    args = ap.parse_args(argv)
    if args.emulate and os.environ.get("TRITON_INTERPRET") != "1":   # triton reads it at import
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])],
                               env={**os.environ, "TRITON_INTERPRET": "1"})
    data = run(args)
    name = f"bench_ops_{data['device']['backend']}{'_emulated' if args.emulate else ''}_{args.dtype}.json"
    print(f"wrote {save(data, args.output or os.path.join(RESULTS, name))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
