"""`ernie-hal devices`: every backend, available or why not, and a tiny op on each device."""

from __future__ import annotations

import json

def add_parser(subparsers) -> None:
    d = subparsers.add_parser("devices", help="list backends and devices, run a tiny op on each")
    d.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    d.add_argument("--no-smoke-test", action="store_true", help="skip the tiny op on each device")
    d.set_defaults(func=run)


def run(args) -> int:
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
