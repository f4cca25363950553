"""`ernie-hal bench serving`: load a running OpenAI-compatible server, report like SGLang's
bench_serving, save the report as JSON."""

from __future__ import annotations

import json
import os
import sys


def add_parser(subparsers) -> None:
    b = subparsers.add_parser("bench", help="benchmarks against a running server")
    kinds = b.add_subparsers(dest="bench_kind")
    s = kinds.add_parser("serving", help="request/token throughput, TTFT, TPOT, ITL, E2E latency of a server")
    add_serving_arguments(s)
    s.set_defaults(func=run)
    b.set_defaults(func=lambda args: b.print_help() or 2)


def add_serving_arguments(s) -> None:
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    s.add_argument("--model", default=None, help="model id to send; default: the server's first model")
    s.add_argument("--dataset", default="random", choices=["random"])
    s.add_argument("--num-prompts", type=int, default=100)
    s.add_argument("--random-input-len", type=int, default=1024)
    s.add_argument("--random-output-len", type=int, default=1024)
    s.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len * ratio, len] as in SGLang (default 0.0; 1.0 = fixed lengths)")
    s.add_argument("--random-prefix-len", type=int, default=0,
                   help="tokens of one shared prefix before every prompt (as vLLM's; a system prompt)")
    s.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    s.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("ERNIE_HAL_API_KEY"))
    s.add_argument("--output", default=None, help="write the report to this JSON file")
    s.add_argument("--allow-remote", action="store_true",
                   help="allow a --base-url that is not a loopback address")


def run(args) -> int:
    from ..serve.bench import bench_serving, format_report, save_json
    report = bench_serving(args.base_url, model=args.model, dataset=args.dataset, num_prompts=args.num_prompts,
                           random_input_len=args.random_input_len, random_output_len=args.random_output_len,
                           random_range_ratio=args.random_range_ratio, random_prefix_len=args.random_prefix_len,
                           request_rate=args.request_rate,
                           max_concurrency=args.max_concurrency, seed=args.seed, api_key=args.api_key,
                           allow_remote=args.allow_remote)
    print(format_report(report))
    if args.output:
        save_json(args.output, report)
        print(f"wrote {args.output}", file=sys.stderr)
    if report["errors"]:
        print("errors: " + json.dumps(report["errors"]), file=sys.stderr)
    return 0 if report["failed"] == 0 else 1
