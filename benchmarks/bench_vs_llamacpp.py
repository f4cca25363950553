"""ernie-hal against llama.cpp on the CPU: the same checkpoint, the same machine, the same run,
engines alternating in every round.

Rows (0.3B shape by default; one pair per precision):
  decode tok/s at batch 1 (llama-bench tg<N>), prefill tok/s for each --prefill length
  (llama-bench pp<N>), achieved GB/s of weight reads during decode against the measured memory
  read bandwidth, peak RSS of each process (the kernel's own accounting: wait4);
  ernie-hal's first decode in a fresh process against its warm decode;
  with --serving: output tok/s and median TPOT of `ernie-hal serve` and `llama-server -np C`
  under the same client (`ernie-hal bench serving`: random token-id prompts, ignore_eos).

Precisions: bf16 / fp32 (llama.cpp BF16 / F32) and, when ernie-hal has them, wint8 / wint4
(llama.cpp Q8_0 / Q4_0). llama.cpp is found in the peers cache or built from the llama-cpp-python
source package (benchmarks/peers/llama_cpp.py); its GGUFs come from its own convert_hf_to_gguf.py.

    python benchmarks/bench_vs_llamacpp.py [--model DIR] [--precisions bf16 fp32 wint8 wint4]
        [--rounds 3] [--threads 2] [--serving] [--output FILE]

Measure only on an otherwise idle machine: llama.cpp's threads spin at barriers, so a busy
neighbour slows it far more than ernie-hal. Writes benchmarks/results/bench_vs_llamacpp_cpu.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peers import llama_cpp as L  # noqa: E402

RESULTS = os.path.join(HERE, "results")
# "-a8": the same weights decoded on int8 activations (load(..., int8_activations=True)), the dot
# llama.cpp's Q8_0 / Q4_0 run; the plain wint rows decode exactly
GGUF_TYPE = {"bf16": "BF16", "fp32": "F32", "wint8": "Q8_0", "wint4": "Q4_0", "wint8-a8": "Q8_0", "wint4-a8": "Q4_0"}
DTYPE = {"bf16": "bf16", "fp32": "fp32", "wint8": "bf16", "wint4": "bf16", "wint8-a8": "bf16", "wint4-a8": "bf16"}


# ---- the ernie-hal side: one fresh process per measurement --------------------------------------
def ernie_child(args) -> dict:
    import torch

    import ernie_hal
    torch.set_num_threads(args.threads)
    kwargs = dict(device="cpu", dtype=DTYPE[args.precision])
    if args.precision.startswith("wint"):
        kwargs["quantization"] = args.precision.split("-")[0]
        if args.precision.endswith("-a8"):
            kwargs["int8_activations"] = True
    model = ernie_hal.load(args.model, **kwargs)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    low = min(1000, vocab // 2)              # clear of the special tokens at the bottom
    ids = lambda n: torch.randint(low, vocab, (n,), generator=g).tolist()  # noqa: E731

    def decode():
        m = model.generate(ids(1), max_new_tokens=args.decode_len, temperature=0, ignore_eos=True).metrics
        return m["decode_tokens"] / m["decode_seconds"]

    def prefill(n):
        t = time.perf_counter()
        model.generate(ids(n), max_new_tokens=1, temperature=0, ignore_eos=True)
        return n / (time.perf_counter() - t)

    out = {"first_decode_tokens_per_s": decode()}         # the very first generate of this process
    decode()                                               # warm-up, as llama-bench does
    out["decode"] = [decode() for _ in range(args.repetitions)]
    for n in args.prefill:
        prefill(n)
        out[f"pp{n}"] = [prefill(n) for _ in range(args.repetitions)]
    out["weight_bytes_per_token"] = weight_bytes_per_token(model)
    return out


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step reads: every weight once as stored (packed bytes where quantized),
    the embedding table only as the head, and of the routed experts the k of E a token uses."""
    return graph_bytes_per_token(model.model.graph, model.dtype)


def graph_bytes_per_token(graph, dtype) -> int:
    c = graph.config
    active = c.moe_k / c.moe_num_experts if c.moe_num_experts else 1.0
    total = sum(w.stored_nbytes(dtype) * (active if w.role == "expert" else 1.0)
                for w in graph.weights() if w.role != "embed")
    return int(total + graph.head.stored_nbytes(dtype))


def active_fraction(graph, dtype) -> float:
    """Share of a model's weight bytes one decode token reads (1.0 for a dense model): applied
    to a GGUF's size for llama.cpp's bytes per token."""
    every = sum(w.stored_nbytes(dtype) for w in graph.weights() if w.role != "embed") + graph.head.stored_nbytes(dtype)
    return graph_bytes_per_token(graph, dtype) / every


def memory_child(args) -> dict:
    """The machine's memory read bandwidth as torch sees it with the same threads (a sum over
    1 GiB), and copy bandwidth (read + write)."""
    import torch
    torch.set_num_threads(args.threads)
    x = torch.ones(1 << 28, dtype=torch.float32)
    y = torch.empty_like(x)
    read, copy = [], []
    for _ in range(7):
        t = time.perf_counter()
        x.sum()
        read.append(x.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        y.copy_(x)
        copy.append(2 * x.nbytes / (time.perf_counter() - t) / 1e9)
    return {"read_gbps": max(read), "copy_gbps": max(copy)}


def spawn_child(args, kind: str, precision: str = "bf16") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--precision", precision,
           "--model", args.model, "--threads", str(args.threads), "--decode-len", str(args.decode_len),
           "--repetitions", str(args.repetitions), "--prefill", *map(str, args.prefill)]
    rc, out, err, rss = L.run_measured(cmd, timeout=3600)
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if rc or not line:
        return {"error": err[-3000:] or f"exit {rc}"}
    result = json.loads(line[-1][7:])
    result["peak_rss_bytes"] = rss
    return result


def model_active_fraction(path: str) -> float:
    import torch

    from ernie_hal.core.model.config import ModelConfig
    from ernie_hal.core.model.graph import build
    return active_fraction(build(ModelConfig.from_file(path)), torch.bfloat16)


def supports_quantization() -> bool:
    import importlib
    api = importlib.import_module("ernie_hal.core.api")
    return "quantization" in inspect.signature(api.load).parameters


# ---- serving ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_client(url: str, concurrency: int, prompts: int, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, "-m", "ernie_hal", "bench", "serving", "--base-url", url,
           "--random-input-len", str(args.serving_input_len), "--random-output-len", str(args.serving_output_len),
           "--random-range-ratio", "1.0", "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
           "--output", path]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return {"error": r.stderr[-2000:]}
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return {"output_tokens_per_s": report["output_throughput"], "median_tpot_ms": report["median_tpot_ms"],
            "median_ttft_ms": report["median_ttft_ms"], "completed": report["completed"],
            "failed": report.get("failed", 0)}


class ErnieServer:
    def __init__(self, args, parallel: int):
        self.args, self.parallel = args, parallel

    def __enter__(self):
        port = free_port()
        ctx = self.args.serving_input_len + self.args.serving_output_len + 64
        cmd = [sys.executable, "-m", "ernie_hal", "serve", "--model", self.args.model, "--device", "cpu",
               "--dtype", "bf16", "--port", str(port), "--max-num-seqs", str(self.parallel),
               "--max-model-len", str(ctx), "--kv-cache-memory", "2GiB", "--log-level", "warning"]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads))
        self.log = tempfile.TemporaryFile("w+")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        import urllib.request
        deadline = time.monotonic() + 600
        while True:
            if self.p.poll() is not None:
                self.log.seek(0)
                raise L.PeerError(f"ernie-hal serve exited ({self.p.returncode}):\n{self.log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise L.PeerError("ernie-hal serve did not answer /health within 600 s")
            time.sleep(0.5)

    def __exit__(self, *exc):
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


# ---- the run ---------------------------------------------------------------------------------------
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir; default: random ernie-4.5-0.3b weights (bf16)")
    ap.add_argument("--precisions", nargs="+", default=list(GGUF_TYPE), choices=list(GGUF_TYPE))
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per engine, alternating")
    ap.add_argument("--repetitions", type=int, default=3, help="measurements inside each process (median)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--prefill", type=int, nargs="*", default=[128, 1024])
    ap.add_argument("--serving", action="store_true", help="also compare the servers")
    ap.add_argument("--serving-concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--serving-input-len", type=int, default=256)
    ap.add_argument("--serving-output-len", type=int, default=128)
    ap.add_argument("--serving-prompts-per-slot", type=int, default=2)
    ap.add_argument("--no-build", action="store_true", help="fail instead of building llama.cpp")
    ap.add_argument("--quantize-via", default=None, choices=["Q8_0"],
                    help="make llama.cpp's Q4_0 from a Q8_0 GGUF (half the disk of BF16) and delete it after")
    ap.add_argument("--output", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = ernie_child if args.child == "ernie-hal" else memory_child
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return 0

    if args.model is None:
        args.model = os.path.join(tempfile.gettempdir(), "ernie-hal-bench-0.3b")
        if not os.path.exists(os.path.join(args.model, "config.json")):
            subprocess.run([sys.executable, "-m", "ernie_hal", "make-checkpoint", "--preset", "ernie-4.5-0.3b",
                            "--out", args.model, "--overwrite"], check=True)
    llama = L.find_or_build(allow_build=not args.no_build)
    precisions = list(args.precisions)
    if any(p.startswith("wint") for p in precisions) and not supports_quantization():
        print("ernie-hal has no weight-only quantization here: wint rows left out", file=sys.stderr)
        precisions = [p for p in precisions if not p.startswith("wint")]
    ggufs = {p: L.gguf_for(llama, args.model, GGUF_TYPE[p], via=args.quantize_via if p.startswith("wint") else None)
             for p in precisions}
    moe_active = model_active_fraction(args.model)
    mem = spawn_child(args, "memory")
    print(f"memory: read {mem.get('read_gbps', 0):.1f} GB/s, copy {mem.get('copy_gbps', 0):.1f} GB/s "
          f"({args.threads} threads)", flush=True)

    runs: dict = {}
    for rnd in range(args.rounds):
        for p in precisions:
            # alternate which engine goes first so neither always runs on a warmer machine
            order = ["ernie-hal", "llama.cpp"] if rnd % 2 == 0 else ["llama.cpp", "ernie-hal"]
            for engine in order:
                if engine == "ernie-hal":
                    r = spawn_child(args, "ernie-hal", p)
                    if "error" not in r:
                        r = {"decode": median(r["decode"]), "first_decode": r["first_decode_tokens_per_s"],
                             **{f"pp{n}": median(r[f"pp{n}"]) for n in args.prefill},
                             "peak_rss_bytes": r["peak_rss_bytes"], "weight_bytes_per_token": r["weight_bytes_per_token"]}
                else:
                    try:
                        b = L.bench(llama, ggufs[p], args.threads, args.prefill, args.decode_len, args.repetitions)
                        r = {"decode": b[f"tg{args.decode_len}"]["tokens_per_s"],
                             **{f"pp{n}": b[f"pp{n}"]["tokens_per_s"] for n in args.prefill},
                             "peak_rss_bytes": b["peak_rss_bytes"],
                             "weight_bytes_per_token": int(os.path.getsize(ggufs[p]) * moe_active)}
                    except L.PeerError as e:
                        r = {"error": str(e)}
                runs.setdefault((p, engine), []).append(r)
                if "error" in r:
                    print(f"round {rnd + 1} {p:<5} {engine:<9}: FAILED {r['error'][-500:]}", file=sys.stderr, flush=True)
                    continue
                pp = "  ".join(f"pp{n} {r[f'pp{n}']:7.1f}" for n in args.prefill)
                print(f"round {rnd + 1} {p:<5} {engine:<9} decode {r['decode']:7.2f} tok/s  {pp}  "
                      f"peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)

    rows = []
    for p in precisions:
        row = {"precision": p, "llama_cpp_type": GGUF_TYPE[p]}
        for engine in ("ernie-hal", "llama.cpp"):
            ok = [r for r in runs.get((p, engine), []) if "error" not in r]
            if not ok:
                row[engine] = {"error": runs[(p, engine)][-1]["error"][-1000:]}
                continue
            e = {k: median([r[k] for r in ok]) for k in ok[0] if k not in ("peak_rss_bytes", "weight_bytes_per_token")}
            e["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
            e["weight_bytes_per_token"] = ok[0]["weight_bytes_per_token"]
            e["decode_gbps"] = e["decode"] * e["weight_bytes_per_token"] / 1e9
            e["decode_roofline_fraction"] = e["decode_gbps"] / mem["read_gbps"] if mem.get("read_gbps") else None
            e["decode_each_round"] = [r["decode"] for r in ok]
            row[engine] = e
        a, b = row.get("ernie-hal", {}), row.get("llama.cpp", {})
        if "decode" in a and "decode" in b:
            row["ratio"] = {k: a[k] / b[k] for k in ["decode", *[f"pp{n}" for n in args.prefill]]}
            # per-round ratios: the pairs ran next to each other, so they cancel machine drift
            row["ratio"]["decode_each_round"] = [x["decode"] / y["decode"] for x, y in
                                                 zip(runs[(p, "ernie-hal")], runs[(p, "llama.cpp")])
                                                 if "error" not in x and "error" not in y]
        rows.append(row)

    serving = []
    if args.serving:
        bf16 = L.gguf_for(llama, args.model, "BF16")
        for rnd in range(max(1, args.rounds - 1)):
            for c in args.serving_concurrency:
                prompts = max(2, c * args.serving_prompts_per_slot)
                order = ["ernie-hal", "llama.cpp"] if rnd % 2 == 0 else ["llama.cpp", "ernie-hal"]
                for engine in order:
                    try:
                        if engine == "ernie-hal":
                            with ErnieServer(args, c) as url:
                                r = bench_client(url, c, prompts, args)
                        else:
                            ctx = args.serving_input_len + args.serving_output_len + 64
                            with L.server(llama, bf16, free_port(), args.threads, c, ctx) as url:
                                r = bench_client(url, c, prompts, args)
                    except L.PeerError as e:
                        r = {"error": str(e)}
                    serving.append({"round": rnd + 1, "concurrency": c, "engine": engine, **r})
                    print(f"serving round {rnd + 1} c={c:<3} {engine:<9} "
                          + (f"{r['output_tokens_per_s']:7.1f} out tok/s  TPOT {r['median_tpot_ms']:7.1f} ms"
                             if "error" not in r else f"FAILED {r['error'][-300:]}"), flush=True)

    result = {"benchmark": "bench_vs_llamacpp", "model": args.model, "device": "cpu",
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads},
              "llama_cpp": llama.version, "memory": mem, "rounds": args.rounds, "repetitions": args.repetitions,
              "decode_len": args.decode_len, "prefill": args.prefill, "date": time.strftime("%Y-%m-%d"),
              "rows": rows, "serving": summarize_serving(serving), "serving_runs": serving}
    dest = os.path.abspath(args.output or os.path.join(RESULTS, "bench_vs_llamacpp_cpu.json"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    from ernie_hal.core.atomic import write_json
    write_json(dest, result)
    print_table(result)
    print(f"saved {dest}")
    return 0


def summarize_serving(runs: list) -> list:
    out = []
    for c in sorted({r["concurrency"] for r in runs}):
        row = {"concurrency": c}
        for engine in ("ernie-hal", "llama.cpp"):
            ok = [r for r in runs if r["concurrency"] == c and r["engine"] == engine and "error" not in r]
            if ok:
                row[engine] = {"output_tokens_per_s": median([r["output_tokens_per_s"] for r in ok]),
                               "median_tpot_ms": median([r["median_tpot_ms"] for r in ok]),
                               "median_ttft_ms": median([r["median_ttft_ms"] for r in ok]), "rounds": len(ok)}
        if "ernie-hal" in row and "llama.cpp" in row:
            row["ratio_output_tokens_per_s"] = (row["ernie-hal"]["output_tokens_per_s"]
                                                / row["llama.cpp"]["output_tokens_per_s"])
        out.append(row)
    return out


def print_table(result: dict) -> None:
    print("\nprecision  engine     decode tok/s  " + "  ".join(f"pp{n:<5}" for n in result["prefill"])
          + "  GB/s (of read limit)  peak RSS  first/warm")
    for row in result["rows"]:
        for engine in ("ernie-hal", "llama.cpp"):
            e = row.get(engine, {})
            if "decode" not in e:
                print(f"{row['precision']:<10} {engine:<10} FAILED")
                continue
            first = f"{e['first_decode'] / e['decode']:.2f}" if e.get("first_decode") else "-"
            print(f"{row['precision']:<10} {engine:<10} {e['decode']:12.2f}  "
                  + "  ".join(f"{e[f'pp{n}']:7.1f}" for n in result["prefill"])
                  + f"  {e['decode_gbps']:6.1f} ({100 * (e['decode_roofline_fraction'] or 0):3.0f}%)"
                  + f"        {e['peak_rss_bytes'] / 2**30:5.2f} GiB  {first}")
        if "ratio" in row:
            print(f"{'':<10} {'ratio':<10} {row['ratio']['decode']:12.2f}  "
                  + "  ".join(f"{row['ratio'][f'pp{n}']:7.2f}" for n in result["prefill"]))
    for s in result["serving"]:
        parts = [f"c={s['concurrency']}"]
        for engine in ("ernie-hal", "llama.cpp"):
            if engine in s:
                parts.append(f"{engine} {s[engine]['output_tokens_per_s']:.1f} tok/s TPOT {s[engine]['median_tpot_ms']:.0f} ms")
        if "ratio_output_tokens_per_s" in s:
            parts.append(f"ratio {s['ratio_output_tokens_per_s']:.2f}")
        print("serving " + "   ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
