"""`ernie-hal quantize`: write a weight-only quantized checkpoint (wint8 / wint4)."""

from __future__ import annotations

import sys

from ..core.sizes import parse_size


def add_parser(subparsers) -> None:
    q = subparsers.add_parser("quantize", help="write a wint8/wint4 weight-only quantized checkpoint")
    q.add_argument("--model", required=True, help="the -PT checkpoint directory to quantize")
    q.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    q.add_argument("--quantization", required=True, choices=["wint8", "wint4"])
    q.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="-1 per channel or a power of two >= 32 (defaults: wint8 -1, wint4 128)")
    q.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..core.model.quantized_writer import write_quantized_checkpoint
    from ..core.quant import resolve
    spec = resolve(args.quantization, args.group_size)
    with tqdm(unit="B", unit_scale=True, desc="quantizing", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        path = write_quantized_checkpoint(args.model, args.out, spec, max_shard_bytes=parse_size(args.shard_size),
                                          progress=bar.update, overwrite=args.overwrite)
    print(f"wrote {path}: {spec.label}")
    return 0
