"""`ernie-hal generate`: load, stream text, report tokens/s."""

from __future__ import annotations

import json
import sys

from .load_flags import add_load_flags, load_kwargs


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="+", help="one or more prompts (several run as one batch)")
    g.add_argument("--model", default=None,
                   help="checkpoint directory or preset name; default: the embedded tiny random-weight model")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, rocm, ixuca, or NAME:INDEX")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="Hugging Face's penalty on tokens of the prompt and output (1 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, on generated tokens (0 = off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, on generated tokens (0 = off)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    g.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain the output to the JSON Schema in FILE (grammar-constrained decoding)")
    add_load_flags(g)
    g.add_argument("--show-plan", action="store_true",
                   help="print where every weight lives (device, pinned host, streamed) before generating")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, metrics) as the last line; no streaming")
    g.set_defaults(func=run)


def _progress_bar(enabled: bool):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm
    bar = {}

    def update(done, total):
        if "b" not in bar:
            bar["b"] = tqdm(total=total, unit="B", unit_scale=True, desc="loading", file=sys.stderr,
                            leave=False)
        bar["b"].update(done - bar["b"].n)

    return update, lambda: bar["b"].close() if "b" in bar else None


def _read_schema(path):
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"--json-schema {path}: cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--json-schema {path}: not valid JSON ({e}); give a JSON Schema file") from None


def run(args) -> int:
    from ..core.api import load
    schema = _read_schema(args.json_schema)        # before the load: a bad file fails fast
    update, close = _progress_bar(sys.stderr.isatty() or not args.json)
    try:
        model = load(args.model, progress=update, **load_kwargs(args))
    finally:
        close()
    info = model.backend.info
    note = " — random weights, the text is noise" if model.random_weights else ""
    print(f"model {model.path} on {info.label} ({info.name}), {model.describe()}{note}",
          file=sys.stderr)
    if args.show_plan and model.plan is not None:
        print(model.plan.table(), file=sys.stderr)
    if args.show_plan and model.parallel is not None:
        from ..core.parallel.layout import table
        print(table(model.parallel), file=sys.stderr)
    prompts = args.prompt
    stream = len(prompts) == 1 and not args.json
    decoder = model.tokenizer.stream_decoder() if stream and model.tokenizer else None

    def on_token(index, token):
        if decoder is not None:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

    out = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, seed=args.seed, chat=args.chat,
                         repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                         frequency_penalty=args.frequency_penalty, json_schema=schema,
                         on_token=on_token)
    m = out[0].metrics
    if args.json:
        payload = {"text": out[0].text, "token_ids": out[0].token_ids, "finish_reason": out[0].finish_reason,
                   "metrics": m, "device": info.label, "dtype": str(model.dtype).replace("torch.", ""),
                   "random_weights": model.random_weights, "kernels": model.kernels,
                   "plan": model.plan.as_dict() if model.plan is not None else None,
                   "parallel": model.parallel}
        if len(out) > 1:
            payload["choices"] = [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                                  for c in out]
        print(json.dumps(payload))
        return 0
    if decoder is not None:
        sys.stdout.write(decoder.flush() + "\n")
    else:
        for i, c in enumerate(out):
            print(f"[{i}] {c.text}")
    print(f"prefill {m['prefill_tokens']} tokens at {m['prefill_tokens_per_s']:.1f} tokens/s, "
          f"decode {m['decode_tokens']} tokens at {m['decode_tokens_per_s']:.1f} tokens/s, "
          f"peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    if "offload" in m:
        print(offload_line(m["offload"]), file=sys.stderr)
    return 0


def offload_line(o: dict) -> str:
    """One line: what the staging moved and where the time went."""
    gib = 2**30
    line = (f"offload: read {o['disk_read_bytes'] / gib:.2f} GiB from the checkpoint in {o['disk_read_seconds']:.1f} s"
            f", copied {o['h2d_bytes'] / gib:.2f} GiB to the device; waited {o['stall_seconds']:.1f} s of "
            f"{o['step_seconds']:.1f} s")
    cache = o.get("expert_cache")
    if cache:
        line += f"; expert cache {cache['hits']} hits / {cache['misses']} misses"
    return line
