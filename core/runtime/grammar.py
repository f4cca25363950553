"""Grammar-constrained decoding on xgrammar (the engine vLLM, SGLang and FastDeploy use).

Three parts:

- `Grammars`: one per model and tokenizer. It hands the tokenizer's vocabulary to xgrammar once
  (byte-level checkpoints, sentencepiece, tokenizer.json), compiles `GrammarSpec`s (JSON Schema,
  any JSON object, regex, a choice of strings, EBNF) and keeps the compiled grammars in an LRU
  cache keyed by the spec, so a schema sent by every request compiles once.
- `GrammarState`: the matcher of one sequence. It advances only when a token is sampled, so
  recompute preemption, prefix caching and chunked prefill (which re-run or skip forwards, never
  re-sample) leave it untouched.
- `mask_logits`: before sampling, the next-token bitmask of every constrained row of the batch
  is filled at once (xgrammar's batch matcher, on the host) and applied to the logits on the
  device they are on; unconstrained rows are untouched.

xgrammar is imported on first use: a server that never gets a grammar never pays its import.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

# JSON Schema keywords xgrammar accepts but does not enforce: refused, so no output silently
# violates the schema a client sent
UNENFORCED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                       "uniqueItems", "contains", "minContains", "maxContains", "unevaluatedItems")
KINDS = ("json_schema", "json_object", "regex", "choice", "ebnf")
CACHE_SIZE = 256
PARALLEL_FILL_ROWS = 8        # from this many constrained rows on, masks are filled on xgrammar's threads


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be compiled (the message says why)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain the output to. `source`: the JSON Schema as canonical JSON text
    (json_schema), the regex, the choices as a JSON list (choice), or the EBNF grammar.
    JSON is compact: ", " and ": " between its tokens and no other whitespace, so a weak model
    cannot loop on newlines (vLLM's `disable_any_whitespace`)."""
    kind: str
    source: str = ""

    @staticmethod
    def json_schema(schema) -> GrammarSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if isinstance(schema, bool):     # `true` allows any JSON value, `false` nothing
            if not schema:
                raise GrammarError("the JSON schema `false` allows no output")
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(f"the JSON schema must be an object, got {type(schema).__name__}")
        check_schema(schema)
        # declared key order kept: the grammar writes properties in that order
        return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))

    @staticmethod
    def choice(options) -> GrammarSpec:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError("the choices must be a non-empty list of non-empty strings")
        return GrammarSpec("choice", json.dumps(options))


def check_schema(schema, where: str = "#") -> None:
    """Refuse keywords the grammar would ignore, anywhere in the schema."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            check_schema(item, f"{where}/{i}")
        return
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in UNENFORCED_KEYWORDS:
            raise GrammarError(f"JSON schema keyword '{key}' at {where} is not supported by the grammar "
                               f"engine (it would not be enforced); remove it")
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            raise GrammarError(f"JSON schema 'allOf' with {len(value)} schemas at {where} is not supported; "
                               f"merge them into one schema")
        if key in ("properties", "patternProperties", "$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():       # names here are property names, not keywords
                check_schema(sub, f"{where}/{key}/{name}")
        elif key not in ("enum", "const", "default", "examples", "required"):
            check_schema(value, f"{where}/{key}")


class Grammars:
    """The grammar compiler of one model: its tokenizer's vocabulary, `vocab_size` logits wide
    (the model's, which may exceed the tokenizer's), ending at `stop_token_ids`."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, max_threads: int = 2):
        import xgrammar as xgr
        self._xgr = xgr
        tokens, vocab_type, prefix_space = vocabulary(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        pieces = xgr.TokenizerInfo(tokens, getattr(xgr.VocabType, vocab_type), vocab_size=vocab_size,
                                   stop_token_ids=self.stop_token_ids).decoded_vocab
        # xgrammar lets UTF-8-encoded surrogates (ED A0..BF ..) through, which decode to U+FFFD:
        # a token that could start one is left out. JSON output is compact, so a control
        # character could only be a raw one inside a string, which JSON forbids (and xgrammar's
        # length-bounded strings let through): JSON grammars also leave out tokens holding one.
        text = [b"" if _may_start_surrogate(t) else t for t in pieces]
        clean = [b"" if any(c < 0x20 for c in t) else t for t in text]
        text_info, json_info = (xgr.TokenizerInfo(v, xgr.VocabType.RAW, vocab_size=vocab_size,
                                                  stop_token_ids=self.stop_token_ids, add_prefix_space=prefix_space)
                                for v in (text, clean))
        # xgrammar's own caches are unbounded by default; ours is bounded by count instead
        self._text = xgr.GrammarCompiler(text_info, max_threads=max_threads, cache_enabled=False)
        self._json = xgr.GrammarCompiler(json_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()           # handlers compile while the engine thread matches
        self.batch = xgr.BatchGrammarMatcher(max_threads=max_threads)

    def compile(self, spec: GrammarSpec):
        """The compiled grammar of `spec` (cached); GrammarError naming the problem otherwise."""
        if spec.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {spec.kind!r}; use one of {', '.join(KINDS)}")
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            compiled = self._compile(spec)
        except GrammarError:
            raise
        except Exception as e:      # xgrammar raises RuntimeError with a C++ location prefix
            raise GrammarError(f"{_what(spec)} does not compile: {_clean(e)}") from None
        with self._lock:
            self._cache[spec] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec):
        if spec.kind == "json_object":
            return self._json.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "json_schema":
            return self._json.compile_json_schema(spec.source, any_whitespace=False, strict_mode=True)
        c = self._text
        if spec.kind == "regex":
            return c.compile_regex(spec.source)
        if spec.kind == "choice":
            options = json.loads(spec.source)
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
        return c.compile_grammar(spec.source)

    def state(self, spec: GrammarSpec) -> GrammarState:
        """A fresh matcher for one sequence."""
        return GrammarState(self, self._xgr.GrammarMatcher(self.compile(spec)))

    @property
    def cache_size(self) -> int:
        return len(self._cache)


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, grammars: Grammars, matcher):
        self.grammars, self.matcher = grammars, matcher

    def accept(self, token: int) -> bool:
        """Advance by a sampled token. False only when the mask allowed nothing (a grammar that
        needs text no token of the vocabulary can write): the sampler then fell back to a
        forbidden token, and the sequence must end there."""
        return bool(self.matcher.accept_token(int(token)))

    def finished(self) -> bool:
        """True once the grammar is over: a stop token was accepted, or the text is complete and
        nothing but a stop token could follow (the sequence then ends without sampling one)."""
        if self.matcher.is_terminated():
            return True
        if not self.matcher.is_completed():
            return False
        mask = self.grammars._xgr.allocate_token_bitmask(1, self.grammars.vocab_size)
        self.matcher.fill_next_token_bitmask(mask)
        allowed = _unpack(mask, self.grammars.vocab_size)[0]
        allowed[self.grammars.stop_token_ids] = False
        return not bool(allowed.any())


def mask_logits(logits: torch.Tensor, states: list) -> torch.Tensor | None:
    """`logits` [rows, V] with every token a row's grammar forbids at -inf (a copy: the raw
    logits stay for log-probabilities); `states[r]` is row r's GrammarState or None. None when
    no row is constrained."""
    rows = [r for r, st in enumerate(states) if st is not None]
    if not rows:
        return None
    grammars = states[rows[0]].grammars
    xgr = grammars._xgr
    bitmask = xgr.allocate_token_bitmask(len(rows), grammars.vocab_size)
    if len(rows) < PARALLEL_FILL_ROWS:      # a thread pool costs more than it saves on few rows
        for i, r in enumerate(rows):
            states[r].matcher.fill_next_token_bitmask(bitmask, i)
    else:
        grammars.batch.batch_fill_next_token_bitmask([states[r].matcher for r in rows], bitmask)
    width = logits.shape[-1]
    allowed = torch.ones(logits.shape, dtype=torch.bool)
    allowed[rows] = _unpack(bitmask, width)
    allowed = allowed.to(logits.device, non_blocking=True)
    return logits.masked_fill(~allowed, float("-inf"))


def _unpack(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """int32 bitmask [rows, ceil(V/32)] -> bool [rows, width] (bits past the bitmask are off)."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)
    if bits.shape[1] >= width:
        return bits[:, :width]
    return torch.cat([bits, bits.new_zeros(bits.shape[0], width - bits.shape[1])], dim=1)


def vocabulary(tokenizer, vocab_size: int) -> tuple:
    """(tokens by id, xgrammar vocab type name, add_prefix_space) for one of ernie-hal's
    tokenizers. Special and control tokens are empty: xgrammar then never allows them inside
    the text (only the stop tokens, where the grammar ends)."""
    from ..model.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer
    if isinstance(tokenizer, ByteTokenizer):
        tokens = [b""] * tokenizer.offset + [bytes([b]) for b in range(256)]
        return _fit(tokens, vocab_size), "RAW", False
    if isinstance(tokenizer, SentencePieceTokenizer):
        sp, special = tokenizer.sp, set(tokenizer._skip)
        tokens = ["" if i in special or sp.IsControl(i) or sp.IsUnknown(i) else sp.IdToPiece(i)
                  for i in range(tokenizer.vocab_size)]
        byte_fallback = any(sp.IsByte(i) for i in range(tokenizer.vocab_size))
        return _fit(tokens, vocab_size), "BYTE_FALLBACK" if byte_fallback else "RAW", True
    if isinstance(tokenizer, HFTokenizer):
        import xgrammar as xgr
        fast = tokenizer.fast
        tokens = [""] * tokenizer.vocab_size
        for token, i in fast.get_vocab(with_added_tokens=True).items():
            tokens[i] = token
        for i, added in fast.get_added_tokens_decoder().items():
            if added.special:
                tokens[i] = ""
        # how tokenizer.json writes its pieces (byte-level "Ġ", "▁" + <0x..>, raw), as
        # xgrammar's own from_huggingface reads it
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(fast.to_str())
        return _fit(tokens, vocab_size), meta["vocab_type"].name, bool(meta["add_prefix_space"])
    raise GrammarError(f"structured output needs one of ernie-hal's tokenizers, got {type(tokenizer).__name__}")


def _may_start_surrogate(piece: bytes) -> bool:
    """The piece holds ED A0..BF (a UTF-8-encoded surrogate) or ends in ED (the next could add one)."""
    return any(b == 0xED and (i + 1 == len(piece) or piece[i + 1] >= 0xA0) for i, b in enumerate(piece))


def _fit(tokens: list, vocab_size: int) -> list:
    """The vocabulary cut or padded (with empty, never-allowed tokens) to the model's logits."""
    empty = tokens[0][:0] if tokens else ""
    return tokens[:vocab_size] + [empty] * max(0, vocab_size - len(tokens))


def _what(spec: GrammarSpec) -> str:
    return {"json_schema": "the JSON schema", "json_object": "the JSON grammar", "regex": "the regex",
            "choice": "the choices", "ebnf": "the EBNF grammar"}[spec.kind]


def _clean(e: Exception) -> str:
    """xgrammar's message without its time stamp and C++ source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[\d:]+\]\s*\S+\.(cc|h):\d+:\s*", "", text)
    text = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", text)
    return text
