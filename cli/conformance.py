"""`ernie-hal conformance`: a backend's kernels against the CPU reference, op x dtype x shape,
plus a whole tiny model; prints pass (max error) / fail / skip (reason), exits 1 on a failure.

--emulate runs the cuda, rocm or ixuca kernels, with that backend's own configs, on CPU tensors
under the Triton interpreter. Triton reads TRITON_INTERPRET before a kernel is decorated, so when
this process was not started with it, the command runs itself again in a child process that is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..core.atomic import write_json

CHILD_ENV = "ERNIE_HAL_CONFORMANCE_CHILD"


def add_parser(subparsers) -> None:
    from ..core.plugins.kernel_table import OPS
    p = subparsers.add_parser(
        "conformance", help="check a backend's kernels against the CPU reference (op x dtype x shape)",
        description="Run every op of a backend, in every dtype it supports, on small shapes against "
                    "kernels/reference computed on the CPU in float64, and a whole tiny dense and MoE "
                    "model against the CPU model. Exits 1 if anything fails.")
    p.add_argument("--device", default="auto",
                   help="backend(s) to check: auto, cpu, cuda, rocm, ixuca, NAME:INDEX, a comma-separated "
                        "list, or all (absent backends are skipped with their probe reason)")
    p.add_argument("--emulate", action="store_true",
                   help="run the GPU backends' kernels and configs on the CPU under the Triton interpreter "
                        "(no GPU needed; slow, so shapes stay tiny)")
    p.add_argument("--emulate-device", metavar="NAME",
                   help="which device of the backend's table to emulate, e.g. A100, MI355X, gfx950 "
                        "(default: H100 / MI300X / BI-V150)")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help="fp32 fp16 bf16 (default: what the device supports; under the interpreter bf16 "
                        "Triton kernels are skipped unless named here)")
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"only these ops (and 'model', 'decode_graphs', 'parallel'): {', '.join(OPS)}")
    p.add_argument("--slow", action="store_true", help="add the production-size shapes")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model rows")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, metavar="N", dest="tensor_parallel_size",
                   help="also check the tiny models split over N ranks (worker processes) against one process")
    p.add_argument("--expert-parallel", action="store_true", help="with --tp: partition the routed experts")
    p.add_argument("--json", metavar="FILE", help="write {\"results\": [...]} to FILE ('-': stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.checks import conformance as conf
    from ..core.plugins.emulate import EmulationError, emulatable, emulate, interpreter_problem, interpreted_env
    from ..core.plugins.registry import DeviceRequest, get_registry

    registry = get_registry()
    names = _backend_names(registry, args.device)
    dtypes = [_dtype(d, conf.DTYPES) for d in args.dtypes] if args.dtypes else None
    ops = args.ops
    if ops:
        conf.cases(ops)   # unknown op names fail here, before any work
    emulated_names = set(emulatable(registry)) if args.emulate else set()
    wants_interpreter = any(registry.spec(DeviceRequest.parse(n).name).name in emulated_names for n in names)
    if wants_interpreter and interpreter_problem() and not os.environ.get(CHILD_ENV):
        cmd = [sys.executable, "-m", conf.__name__.split(".")[0], "conformance", *_argv(args)]
        return subprocess.call(cmd, env={**interpreted_env(), CHILD_ENV: "1"})

    results, tables = [], []
    for text in names:
        req = DeviceRequest.parse(text)
        spec = registry.spec(req.name)
        if spec.name in emulated_names:
            try:
                backend = emulate(spec.name, args.emulate_device, registry)
            except EmulationError as e:
                rows = conf.absent(spec.name, str(e), ops, dtypes)
                results += rows
                tables.append((f"{spec.name} (emulated)", rows, True))
                continue
        else:
            probe = registry.probe(spec.name)
            if not probe.available:
                rows = conf.absent(spec.name, probe.reason, ops, dtypes)
                results += rows
                tables.append((spec.name, rows, True))
                continue
            backend = registry.pick(text)
        rows = conf.run(registry, backend, ops=ops, dtypes=dtypes, slow=args.slow,
                        models=not args.no_model, forced_dtypes=bool(dtypes),
                        tensor_parallel_size=args.tensor_parallel_size, expert_parallel=args.expert_parallel)
        results += rows
        mode = ", Triton interpreter" if conf.emulated(backend) else ""
        tables.append((f"{backend.info.label}  {backend.info.name}  ({backend.info.arch}{mode})", rows, False))

    if args.json != "-":
        for title, rows, is_absent in tables:
            print(_table(title, rows, is_absent))
    failed = sum(r.status == "fail" for r in results)
    summary = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    if args.json:
        _write_json(args.json, {"results": [r.as_dict() for r in results]})
    print(f"{summary['pass']} passed, {summary['fail']} failed, {summary['skip']} skipped",
          file=sys.stderr if args.json == "-" else sys.stdout)
    return 1 if failed else 0


def _backend_names(registry, device: str) -> list:
    if device.strip().lower() == "all":
        return [s.name for s in sorted(registry.specs(), key=lambda s: (-s.priority, s.name))]
    if device.strip().lower() == "auto":
        return [registry.pick("auto").name]
    return [d.strip() for d in device.split(",") if d.strip()]


def _dtype(name, table):
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use fp32, fp16 or bf16") from None


def _argv(args) -> list:
    """The parsed arguments as a command line again (for the interpreted child process)."""
    out = ["--device", args.device]
    if args.emulate:
        out.append("--emulate")
    if args.emulate_device:
        out += ["--emulate-device", args.emulate_device]
    if args.dtypes:
        out += ["--dtypes", *args.dtypes]
    if args.ops:
        out += ["--ops", *args.ops]
    if args.slow:
        out.append("--slow")
    if args.no_model:
        out.append("--no-model")
    if args.tensor_parallel_size != 1:
        out += ["--tp", str(args.tensor_parallel_size)]
    if args.expert_parallel:
        out.append("--expert-parallel")
    if args.json:
        out += ["--json", args.json if args.json == "-" else os.path.abspath(args.json)]
    return out


def _cell(r, notes: dict) -> str:
    if r.status == "pass":
        return f"pass {r.max_error:.1e}"
    mark = notes.setdefault(r.reason or r.status, len(notes) + 1)
    if r.status == "fail":
        err = "" if r.max_error is None else f" {r.max_error:.1e}"
        return f"FAIL{err} [{mark}]"
    return f"skip [{mark}]"


def _table(title: str, rows: list, is_absent: bool) -> str:
    if is_absent:
        return f"\n{title}: skipped, {rows[0].reason if rows else 'not available'}"
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    grid: dict = {}
    impls: dict = {}
    for r in rows:
        grid.setdefault((r.op, r.shape), {})[r.dtype] = r
        if r.impl and r.op not in ("model", "decode_graphs", "parallel"):
            impls.setdefault(r.op, r.impl)
    notes: dict = {}
    width = max([len(s) for _, s in grid] + [5])
    op_width = max([len(op) for op, _ in grid] + [14])     # "swiglu_mlp.wint4"
    lines = [f"\n{title}", f"{'op':<{op_width}} {'shape':<{width}}  " + "  ".join(f"{d:<16}" for d in dtypes)]
    for (op, shape), cells in grid.items():
        lines.append(f"{op:<{op_width}} {shape:<{width}}  " +
                     "  ".join(f"{_cell(cells[d], notes) if d in cells else '-':<16}" for d in dtypes))
    if impls:
        lines.append("implementations: " + ", ".join(f"{op}={impl}" for op, impl in impls.items()))
    lines += [f"[{n}] {reason}" for reason, n in notes.items()]
    return "\n".join(lines)


def _write_json(path: str, data: dict) -> None:
    if path == "-":
        print(json.dumps(data, indent=2))
        return
    write_json(path, data)
