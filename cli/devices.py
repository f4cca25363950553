"""`ernie-hal devices`: every backend, available or why not, and a tiny op on each device."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    d = subparsers.add_parser("devices", help="list backends and devices, run a tiny op on each")
    d.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    d.add_argument("--no-smoke-test", action="store_true", help="skip the tiny op on each device")
    d.add_argument("--show-plan", action="store_true",
                   help="instead: print the tensor-parallel layout of --model over --tp ranks (what each rank "
                        "holds, bytes per rank) from its config alone, without loading or writing weights")
    d.add_argument("--model", default=None, help="with --show-plan: checkpoint directory or preset name")
    d.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, metavar="N", dest="tensor_parallel_size")
    d.add_argument("--expert-parallel", action="store_true")
    d.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="with --show-plan: the dtype of the weights that are not quantized")
    d.add_argument("--quantization", default=None, choices=["none", "wint8", "wint4"],
                   help="with --show-plan: count the quantized weights as packed integers plus fp32 scales")
    d.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="with --show-plan --quantization: -1 per channel, or a power of two >= 32")
    d.set_defaults(func=run)


def run(args) -> int:
    if args.show_plan:
        return _show_plan(args)
    from ..core.api import devices
    rows = devices(smoke_test=not args.no_smoke_test)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'backend':<8} {'device':<8} {'status':<10} {'arch':<10} {'memory':>10}  {'name / reason'}")
    for r in rows:
        if not r["available"]:
            print(f"{r['backend']:<8} {'-':<8} {'absent':<10} {'-':<10} {'-':>10}  {r['reason']}")
            continue
        mem = f"{r['memory_bytes'] / 2**30:.1f} GiB" if r["memory_bytes"] else "?"
        status = r["smoke_test"] or "ok"
        print(f"{r['backend']:<8} {r['device']:<8} {status:<10} {r['arch']:<10} {mem:>10}  {r['name']}"
              + (f"  [{r['smoke_detail']}]" if r["smoke_detail"] else ""))
    return 0


def _show_plan(args) -> int:
    from ..core.api import parallel_plan
    from ..core.parallel.layout import table
    desc = parallel_plan(args.model, args.tensor_parallel_size, args.expert_parallel, args.dtype,
                         args.quantization, args.group_size)
    print(json.dumps(desc, indent=2) if args.json else table(desc))
    return 0
