"""Offload on this machine: checkpoints bigger than RAM, run under a host budget of a few GiB.

Cases (each a random-weight checkpoint written with `ernie-hal make-checkpoint`, deleted after):
  300b  ERNIE-4.5-300B-A47B shape truncated to --layers 5 (29.5 GiB > this machine's 24 GiB RAM),
        --max-host-memory 4GiB
  21b   ERNIE-4.5-21B-A3B shape, all 28 layers (40.7 GiB), budgets 1/4 of its size
  21b-peer  the 21B shape truncated to 6 layers (8.1 GiB), budgets 1/4 of its size, ernie-hal and
        Hugging Face accelerate's offload (device_map="auto", max_memory, disk offload) side by side

--quantization wint4 (or wint8) adds, for the 300b and 21b-3 cases, the same run on a quantized copy of the
checkpoint written by `ernie-hal quantize` (deleted after): the staging engine then moves packed
bytes, under the same budgets. With --rounds N the bf16 and quantized runs alternate (bf16 first
in even rounds, the quantized one first in odd ones), each from a dropped page cache.

Reported per run: prefill and decode tokens/s, bytes read from the checkpoint per decoded token,
achieved read GB/s (inside pread, and over the decode wall time) against the disk's sequential
read rate measured here on the same file with its pages dropped first, where decode time goes
(waiting for staged weights vs computing), expert-cache hits, and peak RSS above the level
before loading (ru_maxrss; each run in a fresh process forked by a small shell, because Linux
carries ru_maxrss across exec).

    python benchmarks/bench_offload.py [--cases 300b 21b 21b-peer] [--quantization wint4] [--rounds N]
                                       [--workdir DIR] [--keep]

Writes benchmarks/results/bench_offload_cpu.json (temp file, then rename). The parent never
imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
GiB = 2**30
CASES = {
    "300b": dict(preset="ernie-4.5-300b-a47b", layers=5, host="4GiB", device=None, peer=False, quant=True),
    "21b": dict(preset="ernie-4.5-21b-a3b", layers=None, host="quarter", device="quarter", peer=False),
    "21b-peer": dict(preset="ernie-4.5-21b-a3b", layers=6, host="quarter", device="quarter", peer=True),
    # the 21B shape cut to 3 layers (1 dense + 2 MoE; 3.9 GB, 1.04 GB at wint4, so 700 MiB stages
    # both): a quantized comparison that fits a shared machine's time (quantizing the 300b case's
    # 31.7 GB wrote 2.3 of its 8.5 GB in 15 minutes of contended CPU here: about an hour in all)
    "21b-3": dict(preset="ernie-4.5-21b-a3b", layers=3, host="700MiB", device=None, peer=False, quant=True),
    "smoke": dict(preset="tiny-moe", layers=None, host="1000KiB", device=None, peer=True, quant=True),   # a dry run
}
DEFAULT_CASES = ["300b", "21b", "21b-peer"]


# ---- measurements the parent makes (no torch) -------------------------------------------------
def checkpoint_files(path: str) -> list:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def drop_cache(files) -> None:
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_gbps(files, limit: int = 4 * GiB, chunk: int = 64 * 2**20) -> dict:
    """Sequential pread of up to `limit` bytes of the checkpoint, its pages dropped first."""
    drop_cache(files)
    buf = bytearray(chunk)
    mv, done = memoryview(buf), 0
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            off = 0
            while done < limit:
                n = os.preadv(fd, [mv], off)
                if n <= 0:
                    break
                off += n
                done += n
                os.posix_fadvise(fd, off - n, n, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if done >= limit:
            break
    dt = time.perf_counter() - t0
    return {"bytes": done, "seconds": dt, "gbps": done / dt / 1e9}


def make_checkpoint(preset: str, layers, out: str) -> dict:
    cmd = [sys.executable, "-m", "ernie_hal", "make-checkpoint", "--preset", preset, "--out", out]
    if layers:
        cmd += ["--layers", str(layers)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    size = sum(os.path.getsize(f) for f in checkpoint_files(out))
    return {"bytes": size, "seconds": dt, "write_gbps": size / dt / 1e9}


def quantize_checkpoint(src: str, scheme: str, out: str) -> dict:
    """The project's own `ernie-hal quantize` (streamed, bounded memory)."""
    cmd = [sys.executable, "-m", "ernie_hal", "quantize", "--model", src, "--out", out, "--quantization", scheme]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    return {"scheme": scheme, "bytes": sum(os.path.getsize(f) for f in checkpoint_files(out)), "seconds": dt}


def spawn(args_list: list, timeout: int = 3600) -> dict:
    """A child measurement in a fresh process, forked by a small shell so its ru_maxrss is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args_list]
    out = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd], capture_output=True, text=True,
                         timeout=timeout)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        return {"error": out.stderr[-3000:], "returncode": out.returncode}
    return json.loads(line[-1][7:])


# ---- children ----------------------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_ernie(a) -> dict:
    import torch

    from ernie_hal.core.api import load
    # the reader thread needs a core: with every core in torch's pool, each parallel op waits on
    # a descheduled worker (on 2 cores a 4 us op took ~6 ms while the reader was busy)
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) - 1))
    warm = load("tiny-moe", device="cpu")           # torch's one-time setup, outside the measure
    warm.generate([1, 2, 3], max_new_tokens=2, temperature=0)
    del warm
    before, peak_before = rss(), peak()
    t0 = time.perf_counter()
    m = load(a.model, device="cpu", max_host_memory=a.host, max_device_memory=a.device_mem, offload=a.offload)
    load_s = time.perf_counter() - t0
    after_load = rss()
    snaps = []

    def on_token(index, token):
        snaps.append((time.perf_counter(), m.offload_stats()))

    prompt = torch.randint(3, m.config.vocab_size, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    out = m.generate(prompt, max_new_tokens=a.new, temperature=0, ignore_eos=True, on_token=on_token)
    total = time.perf_counter() - t0
    (t_first, s0), (t_last, s1) = snaps[0], snaps[-1]
    n = len(snaps) - 1
    dbytes = s1["disk_read_bytes"] - s0["disk_read_bytes"]
    dread = s1["disk_read_seconds"] - s0["disk_read_seconds"]
    dwall = t_last - t_first
    c0, c1 = s0.get("expert_cache", {}), s1.get("expert_cache", {})
    res = {
        "engine": "ernie-hal", "offload": a.offload, "host_budget": a.host, "device_budget": a.device_mem,
        "load_seconds": load_s, "load_bytes": s1["load_bytes"],
        "prefill_tokens": a.prompt, "prefill_seconds": out.metrics["prefill_seconds"],
        "prefill_tokens_per_s": out.metrics["prefill_tokens_per_s"],
        "prefill_read_bytes": s0["disk_read_bytes"],
        "decode_tokens": n, "decode_seconds": dwall, "decode_tokens_per_s": n / dwall if dwall else 0.0,
        "decode_read_bytes_per_token": dbytes / n if n else 0,
        "decode_read_gbps_in_pread": dbytes / dread / 1e9 if dread else 0.0,
        "decode_read_gbps_over_wall": dbytes / dwall / 1e9 if dwall else 0.0,
        "decode_stall_seconds": s1["stall_seconds"] - s0["stall_seconds"],
        "decode_compute_seconds": s1["compute_seconds"] - s0["compute_seconds"],
        "decode_expert_hits": c1.get("hits", 0) - c0.get("hits", 0),
        "decode_expert_misses": c1.get("misses", 0) - c0.get("misses", 0),
        "total_seconds": total, "compute_threads": s1.get("compute_threads"),
        "rss_before_load_bytes": before, "rss_after_load_bytes": after_load,
        "peak_rss_bytes": peak(), "peak_rss_before_load_bytes": peak_before,
        "peak_rss_above_before_bytes": peak() - before,
        "device_peak_bytes": m.backend.memory.peak,
        "token_ids": out.token_ids, "prompt_ids": prompt,
        "quantization": m.quantization,
        "plan": {k: v for k, v in m.plan.as_dict().items() if k != "roles"}, "plan_table": m.plan.table(),
        "stats_end": s1,
    }
    m.close()
    return res


def child_accelerate(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    import accelerate
    before, peak_before = rss(), peak()
    folder = tempfile.mkdtemp(prefix="hf-offload-", dir=a.workdir)
    try:
        t0 = time.perf_counter()
        budget = int(a.host) if a.host.isdigit() else a.host      # accelerate wants an int or "5GB"
        model = AutoModelForCausalLM.from_pretrained(
            a.model, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": budget}, offload_folder=folder)
        load_s = time.perf_counter() - t0
        devmap = getattr(model, "hf_device_map", {})
        placed = {}
        for v in devmap.values():
            placed[str(v)] = placed.get(str(v), 0) + 1
        prompt = json.loads(a.prompt_ids)
        stamps = []

        class Stamp(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=a.new, do_sample=False, streamer=Stamp(),
                                 min_new_tokens=a.new)
        total = time.perf_counter() - t0
        ids = out[0, len(prompt):].tolist()
        # put() is called once with the prompt, then once per new token
        prefill = stamps[1] - t0
        n = len(stamps) - 2
        decode = stamps[-1] - stamps[1]
        offloaded = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
        return {"engine": "accelerate", "accelerate": accelerate.__version__,
                "host_budget": a.host, "load_seconds": load_s, "device_map_counts": placed,
                "offload_folder_bytes": offloaded,
                "prefill_tokens": len(prompt), "prefill_seconds": prefill,
                "prefill_tokens_per_s": len(prompt) / prefill,
                "decode_tokens": n, "decode_seconds": decode, "decode_tokens_per_s": n / decode if decode else 0.0,
                "total_seconds": total, "threads": torch.get_num_threads(),
                "rss_before_load_bytes": before, "peak_rss_bytes": peak(),
                "peak_rss_before_load_bytes": peak_before, "peak_rss_above_before_bytes": peak() - before,
                "token_ids": ids}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def child(a) -> None:
    fn = child_ernie if a.engine == "ernie-hal" else child_accelerate
    print("RESULT " + json.dumps(fn(a)))


# ---- the parent ----------------------------------------------------------------------------------
def size_arg(value, total: int):
    if value == "quarter":
        return str(total // 4)
    return value


def run_case(name: str, spec: dict, a) -> dict:
    path = os.path.join(a.workdir, f"bench-offload-{name}")
    row = {"case": name, "preset": spec["preset"], "layers": spec["layers"]}
    try:
        if not os.path.exists(os.path.join(path, "config.json")):
            shutil.rmtree(path, ignore_errors=True)
            row["write"] = make_checkpoint(spec["preset"], spec["layers"], path)
        files = checkpoint_files(path)
        total = sum(os.path.getsize(f) for f in files)
        row["checkpoint_bytes"] = total
        row["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        row["disk_read"] = disk_read_gbps(files)
        host, dev = size_arg(spec["host"], total), size_arg(spec["device"], total) if spec["device"] else None
        common = ["--prompt", str(a.prompt), "--new", str(a.new), "--workdir", a.workdir]
        models = {"bf16": path}
        if spec.get("quant") and a.quantization:
            qpath = f"{path}-{a.quantization}"
            if not os.path.exists(os.path.join(qpath, "config.json")):
                shutil.rmtree(qpath, ignore_errors=True)
                row["quantize"] = quantize_checkpoint(path, a.quantization, qpath)
            models[a.quantization] = qpath
        runs = {fmt: [] for fmt in models}
        for r in range(a.rounds):
            for fmt in (list(models) if r % 2 == 0 else list(models)[::-1]):
                drop_cache(checkpoint_files(models[fmt]))
                args = ["--engine", "ernie-hal", "--host", host, "--offload", "auto", "--model", models[fmt], *common]
                if dev:
                    args += ["--device-mem", dev]
                res = spawn(args)
                res["disk_read_gbps_measured"] = row["disk_read"]["gbps"]
                res["round"] = r
                runs[fmt].append(res)
                print(f"[{name}] ernie-hal {fmt} round {r}: "
                      f"{json.dumps({k: v for k, v in res.items() if k not in ('plan_table', 'stats_end', 'token_ids', 'prompt_ids')})}",
                      file=sys.stderr)
        ours = runs["bf16"][0]
        row["ernie_hal"] = ours
        if len(models) > 1:
            row["quantized"] = {"scheme": a.quantization, "runs": runs,
                                "summary": quant_summary(runs, a.quantization)}
        common = ["--model", path, *common]
        if spec["peer"] and "prompt_ids" in ours:
            drop_cache(files)
            peer = spawn(["--engine", "accelerate", "--host", host, "--prompt-ids", json.dumps(ours["prompt_ids"]),
                          *common])
            if "token_ids" in peer:
                peer["same_token_ids_as_ernie_hal"] = peer["token_ids"] == ours["token_ids"]
            row["accelerate"] = peer
            print(f"[{name}] accelerate: {json.dumps({k: v for k, v in peer.items() if k != 'token_ids'})[:3000]}",
                  file=sys.stderr)
    finally:
        if not a.keep:
            shutil.rmtree(path, ignore_errors=True)
            if a.quantization:
                shutil.rmtree(f"{path}-{a.quantization}", ignore_errors=True)
    return row


def quant_summary(runs: dict, scheme: str) -> dict:
    """Medians over rounds, bf16 beside the quantized run, and their ratios."""
    def med(fmt, key):
        vals = sorted(r.get(key, 0.0) for r in runs[fmt] if "error" not in r)
        return vals[len(vals) // 2] if vals else None
    out = {}
    for fmt in runs:
        out[fmt] = {k: med(fmt, k) for k in ("decode_tokens_per_s", "decode_read_bytes_per_token",
                                              "prefill_tokens_per_s", "decode_stall_seconds",
                                              "decode_compute_seconds", "peak_rss_bytes")}
    b, q = out["bf16"], out[scheme]
    if b["decode_read_bytes_per_token"] and q["decode_read_bytes_per_token"]:
        out["read_per_token_ratio"] = b["decode_read_bytes_per_token"] / q["decode_read_bytes_per_token"]
    if b["decode_tokens_per_s"] and q["decode_tokens_per_s"]:
        out["decode_speedup"] = q["decode_tokens_per_s"] / b["decode_tokens_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="ernie-hal")
    p.add_argument("--model")
    p.add_argument("--host")
    p.add_argument("--device-mem", default=None)
    p.add_argument("--offload", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads for ernie-hal (0: cores - 1)")
    p.add_argument("--prompt", type=int, default=4, help="prompt tokens")
    p.add_argument("--prompt-ids", default=None)
    p.add_argument("--new", type=int, default=5, help="new tokens (the first comes from the prefill)")
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    p.add_argument("--workdir", default=os.path.expanduser("~/.cache/ernie-hal"))
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--quantization", default=None, choices=("wint8", "wint4"),
                   help="300b/21b-3 cases: also run a quantized copy of the checkpoint under the same budgets")
    p.add_argument("--rounds", type=int, default=1, help="runs per format, alternating bf16 and quantized")
    p.add_argument("--out", default=os.path.join(RESULTS, "bench_offload_cpu.json"))
    a = p.parse_args()
    if a.child:
        child(a)
        return
    os.makedirs(a.workdir, exist_ok=True)
    rows = []
    for name in a.cases:
        rows.append(run_case(name, CASES[name], a))
        write(a, rows)
    print(json.dumps(rows, indent=1)[:4000])


def write(a, rows) -> None:
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    doc = {"benchmark": "bench_offload", "device": "cpu",
           "machine": {"cpu": platform.machine(), "cores": os.cpu_count(),
                       "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
           "prompt_tokens": a.prompt, "new_tokens": a.new, "quantization": a.quantization, "rounds": a.rounds,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    from ernie_hal.core.atomic import write_json   # here, not at the top: the parent stays light
    write_json(a.out, doc)


if __name__ == "__main__":
    main()
