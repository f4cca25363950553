"""Where a decode step's time goes, per op of the kernel table (the LM head and each projection
apart), for ernie-hal on one device.

Each bound kernel is wrapped with a timer for one generate; decode steps (one token) only. On CPU
the default clock is the calling thread's CPU time with one torch thread (--threads 1), so a
busy shared machine inflates the numbers less than wall time would; --clock wall for the rest.

    python benchmarks/profile_decode.py [--model DIR] [--dtype bf16] [--steps 16]

Writes benchmarks/results/profile_decode_<device>_<dtype>.json (temp file, then rename).
"""

from __future__ import annotations

import argparse
import collections
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _key(t):
    """(storage address, shape) of a weight, plain or packed (PackedWeight: its integers)."""
    data = getattr(t, "data", t) if not hasattr(t, "data_ptr") else t
    return data.data_ptr(), tuple(t.shape)


def profile(model, steps: int, clock) -> dict:
    ops = model.model.kernels.ops
    vocab = model.config.vocab_size
    names = {}
    for lw in model.model.weights.layers:
        for name in ("qkv", "q", "k", "v", "o"):
            t = getattr(lw, name, None)
            if t is not None:
                names.setdefault(_key(t), name)
    spent, calls, depth = collections.Counter(), collections.Counter(), [0]

    def wrap(op, fn):
        def timed(*a, **kw):
            depth[0] += 1
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0 and a[0].shape[0] == 1:    # decode rows only, outermost op only
                    key = op
                    if op == "linear":
                        w = a[1]
                        key = "linear head" if w.shape[0] == vocab else \
                            "linear " + names.get(_key(w), "other")
                    spent[key] += clock() - t0
                    calls[key] += 1
        return timed

    original = dict(ops)
    try:
        for op, fn in original.items():
            ops[op] = wrap(op, fn)
        ids = list(range(100, 116))
        model.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True)   # warm-up
        spent.clear()
        calls.clear()
        stamps = []
        model.generate(ids, max_new_tokens=steps + 1, temperature=0, ignore_eos=True,
                       on_token=lambda i, t: stamps.append(clock()))
    finally:
        ops.clear()
        ops.update(original)
    per_step = (stamps[-1] - stamps[0]) / steps
    rows = [{"what": k, "ms_per_step": v / steps * 1e3, "share": v / steps / per_step,
             "calls_per_step": calls[k] // steps} for k, v in spent.most_common()]
    rest = per_step - sum(spent.values()) / steps
    rows.append({"what": "rest (Python, sampling, engine)", "ms_per_step": rest * 1e3, "share": rest / per_step})
    return {"ms_per_step": per_step * 1e3, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ernie-4.5-0.3b", help="checkpoint dir or preset (default: 0.3B random)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["thread", "wall"], default="thread")
    ap.add_argument("--quantization", default=None, help="wint8 | wint4 (quantized at load)")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--int8-activations", action="store_true", help="with --quantization: decode on int8 activations")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    import torch

    import ernie_hal
    from ernie_hal.core.atomic import write_json
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    quant = {} if args.quantization is None else {"quantization": args.quantization, "group_size": args.group_size,
                                                   "int8_activations": args.int8_activations}
    model = ernie_hal.load(args.model, device=args.device, dtype=args.dtype, **quant)
    result = profile(model, args.steps, clock)
    result.update(benchmark="profile_decode", model=args.model, device=args.device, dtype=args.dtype,
                  threads=args.threads, clock=args.clock, kernels=model.kernels, quantization=args.quantization,
                  int8_activations=args.int8_activations,
                  date=time.strftime("%Y-%m-%d"))
    for r in result["rows"]:
        print(f"{r['what']:32s} {r['ms_per_step']:8.2f} ms/step {r['share']:6.1%}")
    print(f"total {result['ms_per_step']:.1f} ms/step ({args.clock} clock, {args.threads} thread(s))")
    dest = args.output or os.path.join(HERE, "results", f"profile_decode_{args.device.split(':')[0]}_{args.quantization or args.dtype}.json")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    write_json(dest, result)
    print(f"saved {dest}")


if __name__ == "__main__":
    main()
