"""What grammar-constrained decoding costs: decode tokens/s with and without a JSON schema at
batch 1 and 16, the per-step mask time (batch bitmask fill + apply), the one-off vocabulary
handoff to xgrammar, and the compile time of a medium schema (cold, then from the cache).

The constrained runs use a schema whose output length is fixed (an array of exactly N small
integers), so both runs decode the same number of tokens; the free runs use ignore_eos.

    python benchmarks/bench_structured.py [--model DIR] [--device cpu] [--dtype fp32] [--tokens 120]

Writes benchmarks/results/bench_structured_<device>.json (temp file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

MEDIUM_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 10**9},
        "name": {"type": "string", "minLength": 1, "maxLength": 64},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 80}, "city": {"type": "string", "maxLength": 40},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["DE", "FR", "CN", "US", "JP"]}}, "required": ["city", "country"]},
        "contacts": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "kind": {"enum": ["phone", "email"]}, "value": {"type": "string", "maxLength": 32}},
            "required": ["kind", "value"]}},
        "manager": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0}]},
        "created": {"type": "string", "format": "date-time"},
        "notes": {"type": "string", "maxLength": 200},
    },
    "required": ["id", "name", "role", "active", "address"],
}


def fixed_length_schema(n_items: int) -> dict:
    """An array of exactly n one-digit integers: "[d, d, ..., d]" is 3n bytes."""
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": n_items, "maxItems": n_items}


def decode_rate(model, batch: int, tokens: int, schema) -> dict:
    prompts = [f"prompt {i}: give the numbers" for i in range(batch)]
    out = model.generate(prompts, max_new_tokens=tokens, temperature=0, json_schema=schema,
                         ignore_eos=schema is None)
    out = out if isinstance(out, list) else [out]
    m = out[0].metrics
    return {"decode_tokens": m["decode_tokens"], "decode_seconds": round(m["decode_seconds"], 4),
            "decode_tokens_per_s": round(m["decode_tokens_per_s"], 2),
            "tokens_per_sequence": sorted({len(o.token_ids) for o in out}),
            "finish_reasons": sorted({o.finish_reason for o in out})}


class MaskTimer:
    """Times the engine's grammar step (core/runtime/grammar.mask_logits) during real decodes."""

    def __init__(self):
        from ernie_hal.core.runtime import engine
        self.engine, self.inner = engine, engine.mask_logits
        self.seconds, self.calls = 0.0, 0

    def __enter__(self):
        def timed(logits, states):
            start = time.perf_counter()
            out = self.inner(logits, states)
            if out is not None:
                self.seconds += time.perf_counter() - start
                self.calls += 1
            return out
        self.engine.mask_logits = timed
        return self

    def __exit__(self, *exc):
        self.engine.mask_logits = self.inner

    @property
    def per_step(self) -> float:
        return self.seconds / self.calls if self.calls else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir or preset; default: the embedded tiny model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tokens", type=int, default=120, help="tokens decoded per sequence (a multiple of 3)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3, help="alternating free/constrained runs per batch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import ernie_hal
    from ernie_hal.core.runtime.grammar import Grammars, GrammarSpec
    model = ernie_hal.load(args.model, device=args.device, dtype=args.dtype)

    t0 = time.perf_counter()
    model.grammars                                # import xgrammar + hand it the vocabulary
    handoff = time.perf_counter() - t0
    t0 = time.perf_counter()
    Grammars(model.tokenizer, model.config.vocab_size, model.engine.stop_token_ids)
    handoff_warm = time.perf_counter() - t0       # the vocabulary alone (xgrammar imported)
    spec = GrammarSpec.json_schema(MEDIUM_SCHEMA)
    t0 = time.perf_counter()
    model.grammars.compile(spec)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.grammars.compile(GrammarSpec.json_schema(MEDIUM_SCHEMA))
    cached = time.perf_counter() - t0

    schema = fixed_length_schema(args.tokens // 3)
    decode_rate(model, 1, 8, schema)              # warm-up: first-call allocations
    rows = []
    for batch in args.batches:
        # free and constrained runs alternate, so a shared machine's changing load hits both alike
        frees, constrained, masks = [], [], []
        for _ in range(args.rounds):
            frees.append(decode_rate(model, batch, args.tokens, None))
            with MaskTimer() as timer:
                constrained.append(decode_rate(model, batch, args.tokens, schema))
            masks.append(timer.per_step)
        free, held = _median(frees), _median(constrained)
        rows.append({"batch": batch, "free": free, "json_schema": held,
                     "free_rounds_tokens_per_s": [r["decode_tokens_per_s"] for r in frees],
                     "json_schema_rounds_tokens_per_s": [r["decode_tokens_per_s"] for r in constrained],
                     "mask_seconds_per_step": round(statistics.median(masks), 6),
                     "slowdown": round(free["decode_tokens_per_s"] / held["decode_tokens_per_s"], 3)
                     if held["decode_tokens_per_s"] else None})
        print(f"batch {batch:>3}: decode {free['decode_tokens_per_s']:8.1f} tok/s free, "
              f"{held['decode_tokens_per_s']:8.1f} tok/s under the schema (medians of {args.rounds}); mask "
              f"{rows[-1]['mask_seconds_per_step'] * 1e3:.2f} ms/step")
    print(f"vocabulary to xgrammar: {handoff:.2f} s first (import included), {handoff_warm * 1e3:.1f} ms again; "
          f"medium schema compile {cold * 1e3:.1f} ms cold, {cached * 1e6:.0f} us cached")

    import xgrammar
    result = {"model": str(model.path), "device": model.backend.info.label, "dtype": args.dtype,
              "vocab_size": model.config.vocab_size, "tokens_per_sequence": args.tokens,
              "xgrammar": getattr(xgrammar, "__version__", None) or _version("xgrammar"),
              "platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "vocabulary_handoff_seconds": round(handoff, 4), "vocabulary_handoff_warm_seconds": round(handoff_warm, 4),
              "medium_schema_compile_seconds": round(cold, 5), "medium_schema_cached_seconds": round(cached, 7),
              "decode": rows,
              "note": "shared, loaded machine: indicative numbers"}
    os.makedirs(RESULTS, exist_ok=True)
    out = args.out or os.path.join(RESULTS, f"bench_structured_{args.device.split(':')[0]}.json")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


def _median(runs: list) -> dict:
    """The run with the median decode rate."""
    return sorted(runs, key=lambda r: r["decode_tokens_per_s"])[len(runs) // 2]


def _version(name: str):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    sys.exit(main())
