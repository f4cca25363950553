"""ernie-hal vs Hugging Face transformers, same checkpoint, same machine, same run.

Prefill tokens/s (one 1024-token prompt), decode tokens/s (batch 1, 128 new tokens, greedy),
achieved GB/s of weight reads during decode against this machine's measured copy bandwidth,
and peak RSS. Each (engine, dtype) runs in its own process so peak RSS is its own.

    python benchmarks/bench_generate.py [--model DIR] [--device cpu] [--dtypes fp32 bf16]
        [--quantization none wint8 wint4] [--group-size N]

--quantization adds an ernie-hal row per weight-only scheme (quantized at load; transformers
runs the unquantized weights only).

Writes benchmarks/results/bench_generate_<device>.json (temp file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ernie_hal(args) -> dict:
    import torch

    import ernie_hal
    rss0 = peak_rss()
    quant = getattr(args, "quant", None) or "none"
    model = ernie_hal.load(args.model, device=args.device, dtype=args.dtype, quantization=quant,
                           group_size=getattr(args, "group_size", None))
    prompt = torch.randint(3, model.config.vocab_size, (args.prefill_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    short = prompt[:16]

    def prefill():
        t = time.perf_counter()
        _prefill_only(model, prompt)
        sync(args.device)
        return time.perf_counter() - t

    def decode():
        out = model.generate(short, max_new_tokens=args.decode_len, temperature=0, ignore_eos=True)
        m = out.metrics
        return m["decode_seconds"], m["decode_tokens"]

    prefill()  # warm-up
    pre = [prefill() for _ in range(args.repeat)]
    decode()
    dec = [decode() for _ in range(args.repeat)]
    return _report(model.config, args, pre, dec, rss0, weight_bytes(model.model.graph, model.dtype))


def packed_bytes(w, size) -> int:
    return w.quant.packed_nbytes(w.shape) if getattr(w, "quant", None) else w.numel * size


def _prefill_only(model, prompt):
    """A 1024-token prefill through the engine that stops at the first token."""
    model.generate(prompt, max_new_tokens=1, temperature=0, ignore_eos=True)


def run_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ernie_hal.core.model.config import ModelConfig
    from ernie_hal.core.model.graph import build
    rss0 = peak_rss()
    dtype = getattr(torch, DTYPES[args.dtype])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    config = ModelConfig.from_file(args.model)
    prompt = torch.randint(3, config.vocab_size, (1, args.prefill_len),
                           generator=torch.Generator().manual_seed(0)).to(args.device)
    short = prompt[:, :16]

    @torch.inference_mode()
    def prefill():
        t = time.perf_counter()
        model(prompt, use_cache=True, logits_to_keep=1)
        sync(args.device)
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode():
        # HF's fastest plain path: a manual loop over the DynamicCache, no generate() overhead
        out = model(short, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync(args.device)
        t = time.perf_counter()
        for _ in range(args.decode_len - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync(args.device)
        return time.perf_counter() - t, args.decode_len - 1

    prefill()
    pre = [prefill() for _ in range(args.repeat)]
    decode()
    dec = [decode() for _ in range(args.repeat)]
    return _report(config, args, pre, dec, rss0, weight_bytes(build(config), dtype))


def weight_bytes(graph, dtype) -> int:
    """Bytes of weights read per decode step: everything but the embedding table (one row is
    gathered), plus the head (the embedding again when tied)."""
    import torch
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for w in graph.weights():
        if w.role == "embed":
            continue
        total += packed_bytes(w, 4 if w.role == "router" else size)
    return total + packed_bytes(graph.head, size)


def _report(config, args, pre, dec, rss0, wbytes) -> dict:
    p = statistics.median(pre)
    secs = statistics.median(d[0] for d in dec)
    toks = dec[0][1]
    return {"prefill_tokens": args.prefill_len, "prefill_seconds": p, "prefill_tokens_per_s": args.prefill_len / p,
            "decode_tokens": toks, "decode_seconds": secs, "decode_tokens_per_s": toks / secs,
            "decode_weight_gbps": wbytes * toks / secs / 1e9, "weight_bytes_per_token": wbytes,
            "rss_before_load_bytes": rss0, "peak_rss_bytes": peak_rss()}


def measure_copy_gbps(device="cpu", nbytes=1 << 30) -> float:
    """The machine's memory limit as seen by torch: a large tensor copy (read + write)."""
    import torch
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def measure_read_gbps(device="cpu", nbytes=1 << 30) -> float:
    """What decode is bound by: reading a large tensor once (a sum over it, torch's threads)."""
    import torch
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        src.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def child(args):
    if args.engine == "copy":
        print("RESULT " + json.dumps({"memory_copy_gbps": measure_copy_gbps(args.device),
                                      "memory_read_gbps": measure_read_gbps(args.device)}))
        return
    fn = run_ernie_hal if args.engine == "ernie-hal" else run_transformers
    print("RESULT " + json.dumps(fn(args)))


def spawn(args, engine, dtype="fp32", quant="none") -> dict:
    """One measurement in a fresh process. The parent never imports torch nor holds buffers:
    Linux keeps ru_maxrss across fork+exec, so a heavy parent would inflate every child's peak."""
    cmd = [sys.executable, __file__, "--engine", engine, "--dtype", dtype, "--model", args.model,
           "--device", args.device, "--prefill-len", str(args.prefill_len),
           "--decode-len", str(args.decode_len), "--repeat", str(args.repeat)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if quant != "none":
        cmd += ["--quant", quant] + (["--group-size", str(args.group_size)] if args.group_size else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        return {"error": out.stderr[-2000:]}
    return json.loads(line[-1][7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir; default: make ernie-4.5-0.3b random weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--engines", nargs="+", default=["ernie-hal", "transformers"])
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="measurements per process (median)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per engine, alternating engines")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads, also the native CPU GEMV's (default: torch's, the physical cores)")
    ap.add_argument("--output", default=None, help="JSON path (default benchmarks/results/bench_generate_<device>.json)")
    ap.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "wint8", "wint4"],
                    help="ernie-hal rows per weight-only scheme (quantized at load)")
    ap.add_argument("--group-size", type=int, default=None, help="quantization group (default per scheme)")
    ap.add_argument("--quant", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        return child(args)
    if args.model is None:
        args.model = os.path.join(tempfile.gettempdir(), "ernie-hal-bench-0.3b")
        if not os.path.exists(os.path.join(args.model, "config.json")):
            subprocess.run([sys.executable, "-m", "ernie_hal", "make-checkpoint", "--preset", "ernie-4.5-0.3b",
                            "--out", args.model, "--overwrite"], check=True)
    limits = spawn(args, "copy")
    limit, read_limit = limits.get("memory_copy_gbps", 0.0), limits.get("memory_read_gbps", 0.0)
    # Rounds: every (dtype, engine) once per round, engines alternating, so a noisy neighbour on a
    # shared machine slows both alike; each row is the median over rounds.
    runs: dict = {}
    for rnd in range(args.rounds):
        for dtype in args.dtypes:
            for engine, quant in [(e, q) for e in args.engines
                                  for q in (args.quantization if e == "ernie-hal" else ["none"])]:
                r = spawn(args, engine, dtype, quant)
                runs.setdefault((engine, dtype, quant), []).append(r)
                if "error" in r:
                    print(f"{engine} {dtype} {quant}: FAILED\n{r['error']}", file=sys.stderr)
                    continue
                print(f"round {rnd + 1}  {engine:<13} {dtype:<5} {quant:<5} prefill {r['prefill_tokens_per_s']:8.1f} tok/s   "
                      f"decode {r['decode_tokens_per_s']:7.2f} tok/s   peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB",
                      flush=True)
    rows = []
    for (engine, dtype, quant), results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            rows.append({"engine": engine, "dtype": dtype, "quantization": quant, "error": results[-1]["error"]})
            continue
        row = {key: statistics.median(r[key] for r in ok) for key in ok[0] if isinstance(ok[0][key], float)}
        row.update(engine=engine, dtype=dtype, quantization=quant, rounds=len(ok), prefill_tokens=ok[0]["prefill_tokens"],
                   decode_tokens=ok[0]["decode_tokens"], weight_bytes_per_token=ok[0]["weight_bytes_per_token"],
                   peak_rss_bytes=max(r["peak_rss_bytes"] for r in ok),
                   rss_before_load_bytes=min(r["rss_before_load_bytes"] for r in ok),
                   decode_tokens_per_s_each_round=[r["decode_tokens_per_s"] for r in ok])
        rows.append(row)
        print(f"{engine:<13} {dtype:<5} {quant:<5} prefill {row['prefill_tokens_per_s']:8.1f} tok/s   "
              f"decode {row['decode_tokens_per_s']:7.2f} tok/s   "
              f"{row['decode_weight_gbps']:6.2f} GB/s ({row['decode_weight_gbps'] / max(read_limit, 1e-9):.0%} of the "
              f"{read_limit:.1f} GB/s read limit; copy {limit:.1f} GB/s)   "
              f"peak RSS {row['peak_rss_bytes'] / 2**30:5.2f} GiB   (median of {len(ok)} rounds)", flush=True)
    result = {"benchmark": "bench_generate", "model": args.model, "device": args.device,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads or "torch default"},
              "memory_copy_gbps": limit, "memory_read_gbps": read_limit, "prefill_len": args.prefill_len, "decode_len": args.decode_len,
              "rounds": args.rounds, "repeat": args.repeat,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    dest = os.path.abspath(args.output or os.path.join(RESULTS, f"bench_generate_{args.device.split(':')[0]}.json"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    from ernie_hal.core.atomic import write_json   # after the children: the parent stays light
    write_json(dest, result)
    print(f"saved {dest}")


if __name__ == "__main__":
    main()
