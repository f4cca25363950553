"""`ernie-hal make-checkpoint`: a random-weight checkpoint in the exact -PT format."""

from __future__ import annotations

import sys

from ..core.sizes import parse_size

def add_parser(subparsers) -> None:
    m = subparsers.add_parser("make-checkpoint", help="write a random-weight checkpoint in the -PT format")
    m.add_argument("--preset", required=True,
                   choices=["ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b", "tiny", "tiny-moe"])
    m.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    m.add_argument("--layers", type=int, default=None, help="truncate depth to N layers")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    m.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it holds a checkpoint (a config.json of an ERNIE-4.5 model); anything else is refused")
    m.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..core.model.config import preset
    from ..core.model.defaults import make_random_model
    from ..core.model.graph import build
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    config = preset(args.preset, layers=args.layers).replace(dtype=dtype)
    total = build(config).total_bytes
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", file=sys.stderr) as bar:
        path = make_random_model(config, args.out, seed=args.seed, dtype=dtype, overwrite=args.overwrite,
                                 progress=bar.update, max_shard_bytes=parse_size(args.shard_size))
    print(f"wrote {path}: {args.preset}, {config.num_hidden_layers} layers, {total / 2**30:.2f} GiB, "
          f"random weights (seed {args.seed})")
    return 0
