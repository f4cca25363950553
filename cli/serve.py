"""`ernie-hal serve`: the OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import os
import sys

from ..core.sizes import parse_size
from ..serve.limits import Limits
from ..serve.security import Access
from .load_flags import add_load_flags, load_kwargs


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("serve", help="serve the OpenAI API (/v1/chat/completions, /v1/completions)")
    s.add_argument("--model", default=None,
                   help="checkpoint directory or preset name; default: the embedded tiny random-weight model")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send; default: --model as given (or the default preset's name)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, rocm, ixuca, or NAME:INDEX")
    s.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("ERNIE_HAL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                        "$ERNIE_HAL_API_KEY, else none)")
    s.add_argument("--allowed-hosts", default="",
                   help="comma-separated Host names answered besides loopback ones ('*': any); bound to a "
                        "loopback address, other Hosts get 403 (DNS-rebinding guard)")
    s.add_argument("--allowed-origins", default="",
                   help="comma-separated origins (scheme://host[:port], '*': any) browsers may POST from; "
                        "other cross-origin POSTs get 403")
    s.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in the running batch")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step: decodes plus prefill chunks (long prompts are chunked)")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="context length served (prompt + completion); default: the model's, capped by the KV cache")
    s.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache size in blocks")
    s.add_argument("--kv-cache-memory", default=None,
                   help="KV-cache size in bytes (e.g. 4GiB); default: enough for --max-num-seqs full-length "
                        "sequences, at most --kv-cache-fraction of the memory free after loading")
    s.add_argument("--kv-cache-fraction", type=float, default=0.5,
                   help="cap of the default KV-cache size, as a fraction of free device memory (default 0.5)")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    s.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share the KV blocks of a common prompt prefix between requests")
    d = Limits()
    s.add_argument("--max-request-bytes", default=str(d.max_request_bytes),
                   help=f"largest request body (e.g. 16MiB; default {d.max_request_bytes}); larger ones get 413")
    s.add_argument("--max-seqs-per-request", type=int, default=d.max_seqs_per_request,
                   help=f"most prompts x n in one request (default {d.max_seqs_per_request}); more get 400")
    s.add_argument("--max-waiting-seqs", type=int, default=d.max_waiting_seqs,
                   help=f"most sequences waiting behind the running batch (default {d.max_waiting_seqs}); "
                        f"beyond, requests get 429 with Retry-After")
    s.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help=f"seconds a client has to send a request's headers (default {d.header_timeout:g})")
    s.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"seconds a client has to send a request's body (default {d.body_timeout:g}); then 408")
    s.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help=f"on SIGTERM/SIGINT, seconds in-flight requests may finish (default "
                        f"{d.shutdown_timeout:g}); the rest end with 503 / an SSE error event")
    add_load_flags(s)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=run)


def checked(args) -> tuple:
    """(Limits, Access, KV-cache bytes) from the flags; ValueError naming the first bad flag.
    Everything is checked before the model loads, so a typo costs no loading time."""
    def positive(name, value, allow_none=True):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 (any free port) and 65535, got {args.port}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks", "block_size"):
        positive(name.replace("_", "-"), getattr(args, name))
    if args.block_size > 1024:
        raise ValueError(f"--block-size must be at most 1024 tokens, got {args.block_size}")
    import math
    if not (math.isfinite(args.kv_cache_fraction) and 0 < args.kv_cache_fraction <= 1):
        raise ValueError(f"--kv-cache-fraction must be in (0, 1], got {args.kv_cache_fraction}")
    kv_bytes = _size("--kv-cache-memory", args.kv_cache_memory) if args.kv_cache_memory else None
    limits = Limits(max_request_bytes=_size("--max-request-bytes", args.max_request_bytes),
                    max_seqs_per_request=args.max_seqs_per_request, max_waiting_seqs=args.max_waiting_seqs,
                    header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                    shutdown_timeout=args.shutdown_timeout)
    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())
    access = Access(api_key=args.api_key, bound_host=args.host, allowed_hosts=split(args.allowed_hosts),
                    allowed_origins=split(args.allowed_origins))
    return limits, access, kv_bytes


def _size(flag: str, text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    if value < 1:
        raise ValueError(f"{flag} must be a positive size, got {text!r}")
    return value


def run(args) -> int:
    import logging

    from ..serve import build_server, create_app
    from ..serve.shutdown import uvicorn_server
    from ..core.api import load
    from ..core.model.defaults import DEFAULT_PRESET
    limits, access, kv_bytes = checked(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model = load(args.model, **load_kwargs(args))
    if args.max_model_len is not None and args.max_model_len > model.config.max_position_embeddings:
        raise ValueError(f"--max-model-len {args.max_model_len} is longer than the model's context of "
                         f"{model.config.max_position_embeddings} tokens (max_position_embeddings)")
    if model.group is not None:      # a lost rank ends the server too (the message is printed first)
        model.group.on_failure = lambda message: os._exit(1)
    server = build_server(
        model, args.served_model_name or args.model or DEFAULT_PRESET, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=kv_bytes, kv_cache_fraction=args.kv_cache_fraction, block_size=args.block_size,
        prefix_caching=not args.no_prefix_caching, limits=limits, access=access)
    kv = server.engine.scheduler.kv
    info = model.backend.info
    note = " (random weights, the text is noise)" if model.random_weights else ""
    print(f"serving {server.name!r}: {model.path}{note} on {info.label} ({info.name}), "
          f"{model.describe()}; context {server.max_model_len} tokens; KV cache "
          f"{kv.num_blocks} blocks x {kv.block_size} tokens ({kv.nbytes / 2**20:.0f} MiB); "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    if model.parallel is not None:
        p = model.parallel
        print(f"{p['mode']} over {p['world_size']} ranks, "
              f"{max(r['bytes'] for r in p['ranks']) / 2**20:.0f} MiB of weights per rank", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    uvicorn_server(server, create_app(server), args.host, args.port, args.log_level).run()
    return 0
