"""Kernel launches per decoder layer of one eager decode step (core/checks/launches.py), per model.

    python benchmarks/launch_counts.py --device cpu --models tiny-moe
    python benchmarks/launch_counts.py --device cuda --emulate --models tiny-moe   # Triton, interpreted
    python benchmarks/launch_counts.py --device cuda --models ernie-4.5-21b-a3b --layers 4

Counts Triton launches and the aten ops that do device work, per layer (dense / MoE), plus host
syncs in the step. On a real GPU the step is also run under torch.profiler and the device
kernels it records are counted (the ground truth the dispatch count is a lower bound of).
`--layers N` builds a random checkpoint of the model's shapes with N layers (as bench_e2e does);
presets (tiny, tiny-moe) load as they are. Writes benchmarks/results/launch_counts_<backend>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _model(name: str, backend, dtype: str, layers: int | None, ckpt_dir: str):
    import ernie_hal
    if name in ("tiny", "tiny-moe") or os.path.isdir(name):
        return ernie_hal.load(name, device=backend, dtype=dtype)
    sys.path.insert(0, HERE)
    from bench_e2e import checkpoint      # the same random checkpoints bench_e2e writes
    return ernie_hal.load(checkpoint(name, layers, "bf16", ckpt_dir), device=backend, dtype=dtype)


def _profiled_kernels(model, batch: int, context: int) -> int | None:
    """Device kernels torch.profiler records in one eager decode step (GPU only)."""
    import torch
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    from ernie_hal.core.checks.launches import decode_step_launches
    decode_step_launches(model, batch, context)        # warm: compiles, cuBLAS handles
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_step_launches(model, batch, context)
        torch.cuda.synchronize()
    # the prefill step runs too inside decode_step_launches: the profiler count covers both
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(args) -> dict:
    import torch

    from ernie_hal.core.checks.launches import decode_step_launches
    from ernie_hal.core.plugins.emulate import emulate
    from ernie_hal.core.plugins.registry import get_registry
    reg = get_registry()
    backend = emulate(args.device, None, reg) if args.emulate else reg.pick(args.device)
    rows = []
    for name in args.models:
        model = _model(name, backend, args.dtype, args.layers, args.checkpoints)
        r = decode_step_launches(model, args.batch, args.context)
        r.pop("kernels")
        r["model"] = name
        r["kernels_bound"] = dict(model.kernels)
        if not args.emulate:
            r["profiler_device_kernels_prefill_and_decode"] = _profiled_kernels(model, args.batch, args.context)
        rows.append(r)
        print(f"{name:24} per layer {r['per_layer']}  step {r['step_total']}  host syncs {r['host_syncs']}",
              flush=True)
    return {"device": {"backend": backend.name, "name": backend.info.name, "emulated": bool(args.emulate)},
            "torch": torch.__version__, "batch": args.batch, "context": args.context, "results": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--emulate", action="store_true", help="the backend's Triton kernels on CPU tensors (interpreted)")
    ap.add_argument("--models", nargs="+", default=["tiny-moe"])
    ap.add_argument("--layers", type=int, help="random checkpoint of the model's shapes with this many layers")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--checkpoints", default="/tmp/ernie-hal-ckpt")
    ap.add_argument("--output")
    args = ap.parse_args(argv)
    if args.emulate and os.environ.get("TRITON_INTERPRET") != "1":   # triton reads it at import
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])],
                               env={**os.environ, "TRITON_INTERPRET": "1"})
    data = run(args)
    from ernie_hal.core.atomic import write_json
    name = f"launch_counts_{data['device']['backend']}{'_emulated' if args.emulate else ''}.json"
    print(f"wrote {write_json(args.output or os.path.join(RESULTS, name), data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
