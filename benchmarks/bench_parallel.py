"""Tensor / expert parallel: per-rank memory and tokens/s for N = 1, 2, ... ranks, same checkpoint.

Each N runs in its own process (rank 0; it starts the other N - 1 ranks itself), so each rank's
peak RSS is its own: growth while loading = peak RSS after loading minus RSS before; held = RSS
right after loading minus RSS before (transients of the load, such as quantizing, gone). Prefill
tokens/s (one prompt), decode tokens/s (batch 1, greedy), and whether the greedy ids equal N = 1's
at the same --quantization (each scheme a row per N; quantized at load, each rank its own slices).
On a 2-core CPU this measures correctness and memory, not speed: the ranks share the cores.

    python benchmarks/bench_parallel.py [--model DIR|PRESET] [--layers L] [--device cpu] [--tp 1 2]
                                        [--quantization none wint8 wint4] [--max-host-memory none 80MiB]

--max-host-memory: one row per value and N, each a per-rank budget (ranks stage what does not fit
from the checkpoint, core/parallel/budgets.py); ids are compared with N = 1 without a budget.

Without --model a ~130 MiB fp32 checkpoint (hidden 512, 8 layers) is written once to --checkpoints.
Writes benchmarks/results/bench_parallel_<device>.json (temp file, then rename).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def checkpoint(args) -> str:
    from ernie_hal.core.model.config import preset
    from ernie_hal.core.model.defaults import is_preset, make_random_model
    if args.model and os.path.isdir(args.model):
        return args.model
    if args.model and is_preset(args.model):
        cfg, name = preset(args.model, args.layers), f"{args.model}-L{args.layers or 'all'}"
    else:
        cfg = preset("tiny").replace(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=8192)
        name = "dense-h512-L8"
    path = os.path.join(args.checkpoints, f"bench-parallel-{name}-{DTYPES[args.dtype]}")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_random_model(cfg, path, dtype=DTYPES[args.dtype], overwrite=True)
    return path


def one(args) -> dict:
    """Runs in the child: load at --tp N, time prefill and decode, report every rank's memory."""
    import psutil
    import torch

    import ernie_hal
    from ernie_hal.core.api import peak_rss_bytes
    # a tiny model first, at the same quantization: the first use of its kernels and imports is
    # not counted as rank 0's load (the other ranks, fresh processes, still count theirs)
    q = args.quantization[0]
    ernie_hal.load("tiny", device=args.device, dtype=args.dtype, quantization=q,
                   group_size=32 if q == "wint4" else None).generate([1, 2], max_new_tokens=1)
    gc.collect()
    t0 = time.perf_counter()
    model = ernie_hal.load(args.model, device=args.device, dtype=args.dtype, tensor_parallel_size=args.one,
                           expert_parallel=args.expert_parallel, quantization=args.quantization[0],
                           max_host_memory=None if args.max_host_memory[0] == "none" else args.max_host_memory[0])
    load_s = time.perf_counter() - t0
    loaded_peak, loaded_rss = peak_rss_bytes(), psutil.Process().memory_info().rss   # as the ranks report theirs
    prompt = torch.randint(3, model.config.vocab_size, (args.prefill_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    model.generate(prompt[:8], max_new_tokens=2, temperature=0, ignore_eos=True)      # warm-up
    out = model.generate(prompt, max_new_tokens=args.decode_len, temperature=0, ignore_eos=True)
    m = out.metrics
    if model.parallel is None:
        ranks = [dict(rank=0, load_growth_bytes=loaded_peak - model.rss_before_load,
                      held_after_load_bytes=loaded_rss - model.rss_before_load)]
    else:
        ranks = [dict(rank=r["rank"], load_growth_bytes=r["peak_rss_bytes"] - r["rss_before_load_bytes"],
                      held_after_load_bytes=r["rss_after_load_bytes"] - r["rss_before_load_bytes"],
                      weight_bytes=r["bytes"]) for r in model.parallel["ranks"]]
    offload = m.get("offload") or {}
    model.close()
    return dict(tp=args.one, max_host_memory=args.max_host_memory[0],
                disk_read_bytes_rank0=offload.get("disk_read_bytes"), quantization=model.quantization["scheme"], group_size=model.quantization["group_size"],
                expert_parallel=bool(args.expert_parallel and args.one > 1), load_seconds=load_s,
                prefill_tokens=m["prefill_tokens"], prefill_tokens_per_s=m["prefill_tokens_per_s"],
                decode_tokens=m["decode_tokens"], decode_tokens_per_s=m["decode_tokens_per_s"],
                token_ids=out.token_ids, ranks=ranks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory or preset (random weights)")
    ap.add_argument("--layers", type=int, default=None, help="with a preset: truncate depth")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--expert-parallel", action="store_true")
    ap.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "wint8", "wint4"],
                    help="one row per scheme and N (default group sizes: wint8 per channel, wint4 128)")
    ap.add_argument("--max-host-memory", nargs="+", default=["none"],
                    help="per-rank host budgets, one row each (none: no budget)")
    ap.add_argument("--prefill-len", type=int, default=64)
    ap.add_argument("--decode-len", type=int, default=32)
    ap.add_argument("--checkpoints", default=os.path.join(tempfile.gettempdir(), "ernie-hal-bench"))
    ap.add_argument("--output", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)     # the child's N
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args)))
        return 0
    path = checkpoint(args)
    rows = []
    for q, budget in [(q, b) for q in args.quantization for b in args.max_host_memory]:
        for n in args.tp:
            cmd = [sys.executable, os.path.abspath(__file__), "--model", path, "--device", args.device,
                   "--dtype", args.dtype, "--prefill-len", str(args.prefill_len), "--decode-len",
                   str(args.decode_len), "--quantization", q, "--max-host-memory", budget, "--one", str(n)] + \
                (["--expert-parallel"] if args.expert_parallel else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append(dict(tp=n, quantization=q, max_host_memory=budget, error=(proc.stderr.strip().splitlines() or ["?"])[-1]))
                print(f"tp {n} {q}: error: {rows[-1]['error']}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for r in rows:
        if "error" in r:
            continue
        base = next((b for b in rows if b.get("tp") == 1 and "error" not in b
                     and b["quantization"] == r["quantization"] and b.get("max_host_memory", "none") == "none"),
                    None)
        if base is not None:
            r["ids_equal_tp1"] = r["token_ids"] == base["token_ids"]
            one_growth = base["ranks"][0]["load_growth_bytes"]
            r["max_rank_growth_vs_tp1"] = max(x["load_growth_bytes"] for x in r["ranks"]) / one_growth
        mem = ", ".join(f"rank {x['rank']} peak +{x['load_growth_bytes'] / 2**20:.0f} MiB, held "
                        f"+{x['held_after_load_bytes'] / 2**20:.0f} MiB" for x in r["ranks"])
        print(f"tp {r['tp']} {r['quantization']} budget {r['max_host_memory']}: prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode "
              f"{r['decode_tokens_per_s']:.1f} tok/s; {mem}; ids equal tp 1: {r.get('ids_equal_tp1')}")
    data = dict(device=args.device, dtype=DTYPES[args.dtype], model=path, host=platform.node(),
                cpus=os.cpu_count(), prefill_len=args.prefill_len, decode_len=args.decode_len,
                note="CPU ranks share the machine's cores: memory and correctness, not speed", results=rows)
    out = args.output or os.path.join(RESULTS, f"bench_parallel_{args.device.replace(':', '')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0 if all("error" not in r and r.get("ids_equal_tp1", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
