"""Weight-only quantization accuracy against bf16: relative logits error, top-1 agreement and
mean KL(bf16 || quantized) over every position of a few prompts, per scheme.

RANDOM WEIGHTS (make-checkpoint's normal init): the numbers show what the rounding does to
Gaussian weights of the real shapes, not what it does to a trained model with outliers.

    python benchmarks/bench_quant_accuracy.py [--preset ernie-4.5-0.3b] [--layers N] [--positions 256]
        [--schemes wint8 wint8:128 wint4 wint4:64 wint4:32]

--layers truncates the depth (the 21B-A3B shape at 4 of its 28 layers, 5.1 GiB in bf16, fits this
machine; the JSON says so in "depth"). The JSON is rewritten after every scheme.
Writes benchmarks/results/bench_quant_accuracy_<preset>[_L<layers>].json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    ref, got = ref.float(), got.float()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"rel_logits_error": ((got - ref).norm() / ref.norm()).item(),
            "max_rel_logits_error": ((got - ref).abs().max() / ref.abs().max()).item(),
            "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "mean_kl": kl.mean().item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ernie-4.5-0.3b")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: make the preset's random weights)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--positions", type=int, default=256, help="positions per prompt")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--schemes", nargs="+", default=["wint8", "wint8:128", "wint4:128", "wint4:64", "wint4:32"])
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    import ernie_hal
    from ernie_hal.core.atomic import write_json
    tag = args.preset + (f"_L{args.layers}" if args.layers else "")
    if args.model is None:
        args.model = os.path.join(tempfile.gettempdir(), f"ernie-hal-bench-{tag}")
        if not os.path.exists(os.path.join(args.model, "config.json")):
            cmd = [sys.executable, "-m", "ernie_hal", "make-checkpoint", "--preset", args.preset, "--out",
                   args.model, "--overwrite"] + (["--layers", str(args.layers)] if args.layers else [])
            subprocess.run(cmd, check=True)
    g = torch.Generator().manual_seed(0)
    base = ernie_hal.load(args.model, device="cpu", dtype="bf16")
    V = base.config.vocab_size
    prompts = [torch.randint(3, V, (args.positions,), generator=g).tolist() for _ in range(args.prompts)]
    ref = torch.cat([base.logits(p) for p in prompts])
    bf16_bytes = base.quantization["weight_bytes"]
    del base
    from ernie_hal.core.model.config import preset
    full_layers = preset(args.preset).num_hidden_layers
    depth = (f"truncated to {args.layers} of the preset's {full_layers} layers (make-checkpoint --layers), "
             f"so the error is that of a {args.layers}-layer network" if args.layers else f"all {full_layers} layers")
    rows = []
    result = {"benchmark": "bench_quant_accuracy", "preset": args.preset, "layers": args.layers,
              "preset_layers": full_layers, "depth": depth,
              "model": args.model, "random_weights": True, "activations": "bf16", "reference": "bf16 weights",
              "positions": args.positions * args.prompts, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "schemes_asked": args.schemes}
    dest = os.path.abspath(args.output or os.path.join(RESULTS, f"bench_quant_accuracy_{tag}.json"))
    for s in args.schemes:
        scheme, _, group = s.partition(":")
        t = time.perf_counter()
        m = ernie_hal.load(args.model, device="cpu", dtype="bf16", quantization=scheme,
                           group_size=int(group) if group else None)
        load_s = time.perf_counter() - t
        got = torch.cat([m.logits(p) for p in prompts])
        q = m.quantization
        row = {"scheme": scheme, "group_size": q["group_size"], "weight_bytes": q["weight_bytes"],
               "bf16_weight_bytes": bf16_bytes, "load_seconds": load_s, **compare(ref, got)}
        rows.append(row)
        print(f"{scheme} g{q['group_size']:<4}  rel err {row['rel_logits_error']:.4f}  top-1 {row['top1_agreement']:.3f}"
              f"  KL {row['mean_kl']:.5f}  weights {q['weight_bytes'] / 2**20:.0f} MiB (bf16 {bf16_bytes / 2**20:.0f})",
              flush=True)
        del m
        write_json(dest, result)       # after every scheme: a run cut short keeps the rows it measured
    print(f"saved {dest}")


if __name__ == "__main__":
    main()
