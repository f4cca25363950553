"""`ernie-hal chat`: talk to a model in the terminal, the conversation kept between turns.

Each turn sends the whole conversation through the chat template; prefix caching keeps the
earlier turns' KV blocks, so a turn computes only what is new. `/reset` starts over, `/exit`
(or end of input) quits.
"""

from __future__ import annotations

import sys

from .load_flags import add_load_flags, load_kwargs

CONTEXT = 4096     # tokens of conversation the KV cache is sized for at the start (it grows past that)


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("chat", help="an interactive chat in the terminal")
    c.add_argument("--model", default=None,
                   help="checkpoint directory or preset name; default: the embedded tiny random-weight model")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, rocm, ixuca, or NAME:INDEX")
    c.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    c.add_argument("--system", default=None, help="a system message for the conversation")
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.8)
    c.add_argument("--top-k", type=int, default=0, help="0 = off")
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    add_load_flags(c)
    c.set_defaults(func=run)


def run(args) -> int:
    from ..core.api import load
    model = load(args.model, prefix_caching=True, **load_kwargs(args))   # earlier turns stay cached
    if model.tokenizer is None:
        print(f"error: {model.path} has no tokenizer, so no chat template", file=sys.stderr)
        return 2
    engine = model.engine
    engine.ensure_kv(engine.blocks_for(min(engine.max_model_len, CONTEXT)))   # room for a conversation
    info = model.backend.info
    note = " — random weights, the text is noise" if model.random_weights else ""
    print(f"model {model.path} on {info.label} ({info.name}), {model.describe()}{note}\n/reset starts over, /exit quits",
          file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    cached = computed = 0
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = list(system)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        decoder = model.tokenizer.stream_decoder()

        def on_token(index, token):
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

        out = model.generate(history, chat=True, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                             seed=args.seed, on_token=on_token)
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": out.text})
        cached += out.metrics["prefix_cached_tokens"]
        computed += out.metrics["prefill_tokens"]
    print(f"prompt tokens: {computed} computed, {cached} reused from earlier turns", file=sys.stderr)
    return 0
