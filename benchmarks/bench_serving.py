"""Serving benchmark: `ernie-hal bench serving` at several concurrencies, one JSON file.

Either against a running server (--base-url), or it starts `ernie-hal serve` itself on a free
loopback port in a separate process (--model; server flags after `--`), so the client's CPU
time is not the server's. The report of each run has SGLang bench_serving's keys.

    python benchmarks/bench_serving.py --model /tmp/ernie-0.3b --device cpu --dtype bf16 \
        --concurrency 1 4 16 --num-prompts 8 16 32 --random-input-len 256 --random-output-len 128 \
        --output benchmarks/results/bench_serving_cpu.json -- --kv-cache-memory 2GiB --max-model-len 2048
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import httpx

from ernie_hal.serve.bench import bench_serving, format_report, save_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, extra: list) -> tuple:
    port = free_port()
    cmd = [sys.executable, "-m", "ernie_hal", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--device", args.device, "--dtype", args.dtype, "--log-level", "warning", *extra]
    if args.model:
        cmd += ["--model", args.model]
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {args.server_log or 'its output'}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the server did not answer /health within {args.startup_timeout} s")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server; default: start one")
    p.add_argument("--model", default=None, help="checkpoint dir for the server this script starts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num-prompts", type=int, nargs="+", default=None,
                   help="one per concurrency (default: 4 x concurrency, at least 8)")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=1.0, help="1.0 = fixed lengths (default here)")
    p.add_argument("--random-prefix-len", type=int, default=0, help="a prefix shared by every prompt")
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", default=None)
    p.add_argument("--server-log", default=None)
    p.add_argument("--startup-timeout", type=float, default=600)
    args = p.parse_args(argv)
    prompts = args.num_prompts or [max(8, 4 * c) for c in args.concurrency]
    if len(prompts) != len(args.concurrency):
        p.error("give one --num-prompts per --concurrency")

    proc, url, cmd = (None, args.base_url, None) if args.base_url else start_server(args, extra)
    runs = []
    try:
        for c, n in zip(args.concurrency, prompts):
            load_before = os.getloadavg()[0]
            report = bench_serving(url, num_prompts=n, random_input_len=args.random_input_len,
                                   random_output_len=args.random_output_len,
                                   random_range_ratio=args.random_range_ratio,
                                   random_prefix_len=args.random_prefix_len, request_rate=args.request_rate,
                                   max_concurrency=c, seed=args.seed)
            # other work on the machine skews CPU numbers: keep the 1-minute load average beside them
            report["loadavg_1min_before_after"] = [load_before, os.getloadavg()[0]]
            print(format_report(report), flush=True)
            runs.append(report)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    result = {"benchmark": "bench_serving", "server_command": cmd and " ".join(cmd[1:]),
              "model": args.model, "device": args.device, "dtype": args.dtype,
              "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
              "date": datetime.now(timezone.utc).date().isoformat(), "runs": runs}
    if args.output:
        save_json(args.output, result)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
