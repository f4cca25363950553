"""CPU weight-only linear: the native GEMV (backends/cpu/qgemv.c) against torch's weight-pack GEMMs
(aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu, the fallback) on the 0.3B shapes, in ms
and GB/s of packed bytes read, beside the machine's read bandwidth measured in the same run.

    python benchmarks/bench_quant_cpu.py [--threads 2] [--rows 1 8 128] [--rounds 9]

Each weight shape is held in enough copies to exceed the caches' share (the MLP shapes are a few
MiB), and the two kernels run alternately, round by round, so a busy shared machine slows both
alike: medians and [min-max] ranges over the rounds. --clock cpu times the calling thread's CPU
(with --threads 1 only), which a busy machine inflates less than wall time.
Writes benchmarks/results/bench_quant_cpu.json (temp file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = (("head 103424x1024", 103424, 1024, 1), ("gate/up 3072x1024", 3072, 1024, 48),
          ("down 1024x3072", 1024, 3072, 48))
SCHEMES = (("wint8", -1), ("wint8", 128), ("wint4", 128), ("wint4", 32), ("wint4", -1))


def read_bandwidth(rounds: int) -> list:
    """GB/s of a sum over 1 GiB with the same threads (what bench_vs_llamacpp calls the limit)."""
    import torch
    x = torch.ones(1 << 28, dtype=torch.float32)
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        out.append(x.nbytes / (time.perf_counter() - t) / 1e9)
    return out


def run(args) -> dict:
    import torch

    from ernie_hal.backends.cpu import quant_kernels as qk
    from ernie_hal.backends.cpu.native import load
    from ernie_hal.core.quant import quantize, resolve

    torch.set_num_threads(args.threads)
    lib, why = load()
    if lib is None:
        raise SystemExit(f"the native CPU kernels are unavailable: {why}")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    bw = read_bandwidth(args.rounds)
    print(f"read bandwidth: median {statistics.median(bw):.1f} GB/s, max {max(bw):.1f} ({args.threads} threads)")
    rows = []
    for scheme, group in SCHEMES:
        spec = resolve(scheme, group)
        for label, N, K, copies in SHAPES:
            pws = [quantize(torch.randn(N, K) * 0.02, spec, torch.bfloat16) for _ in range(copies)]
            kernels = {"native": [qk._gemm_native(lib, p.data, p.scales, p.bits) for p in pws],
                       "torch": [qk._torch_ops(p.data, p.scales, p.bits, p.dtype) for p in pws]}
            nbytes = pws[0].nbytes
            for T in args.rows:
                x = torch.randn(T, K).to(torch.bfloat16)
                times = {k: [] for k in kernels}
                for fns in kernels.values():
                    fns[0](x)                                  # warm-up
                for _ in range(args.rounds):
                    for name, fns in kernels.items():
                        t = clock()
                        for f in fns:
                            f(x)
                        times[name].append((clock() - t) / len(fns))
                row = {"scheme": scheme, "group_size": group, "shape": label, "rows": T, "bytes": nbytes}
                text = []
                for name, ts in times.items():
                    med = statistics.median(ts)
                    row[name] = {"ms": med * 1e3, "gbps": nbytes / med / 1e9,
                                 "gbps_range": [nbytes / max(ts) / 1e9, nbytes / min(ts) / 1e9]}
                    text.append(f"{name} {med * 1e3:8.3f} ms {nbytes / med / 1e9:5.1f} GB/s "
                                f"[{nbytes / max(ts) / 1e9:4.1f}-{nbytes / min(ts) / 1e9:4.1f}]")
                row["speedup"] = row["torch"]["ms"] / row["native"]["ms"]
                rows.append(row)
                print(f"{scheme} g{group:<4} {label:18} T={T:<4} " + " | ".join(text) +
                      f"  x{row['speedup']:.2f}", flush=True)
    return {"threads": args.threads, "clock": args.clock, "rounds": args.rounds, "isa": lib.qisa,
            "read_gbps": {"median": statistics.median(bw), "max": max(bw), "all": bw}, "results": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_quant_cpu.json"))
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures the calling thread only: use it with --threads 1")
    data = run(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
