"""`ernie-hal serve`: the OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import os
import sys

from ..core.sizes import parse_size
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
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $ERNIE_HAL_API_KEY, else none)")
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
    add_load_flags(s)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=run)


def run(args) -> int:
    import logging

    import uvicorn

    from ..serve import build_server, create_app
    from ..core.api import load
    from ..core.model.defaults import DEFAULT_PRESET
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model = load(args.model, **load_kwargs(args))
    server = build_server(
        model, args.served_model_name or args.model or DEFAULT_PRESET, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
        kv_cache_fraction=args.kv_cache_fraction, block_size=args.block_size, api_key=args.api_key,
        prefix_caching=not args.no_prefix_caching)
    kv = server.engine.scheduler.kv
    info = model.backend.info
    note = " (random weights, the text is noise)" if model.random_weights else ""
    print(f"serving {server.name!r}: {model.path}{note} on {info.label} ({info.name}), "
          f"{str(model.dtype).replace('torch.', '')}; context {server.max_model_len} tokens; KV cache "
          f"{kv.num_blocks} blocks x {kv.block_size} tokens ({kv.nbytes / 2**20:.0f} MiB); "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
