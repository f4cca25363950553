"""Tokenizers and chat templates from a checkpoint directory.

Order: `tokenizer.json` (HF `tokenizers`, what transformers 5 loads for ERNIE-4.5), else
`tokenizer.model` (sentencepiece), else the byte-level tokenizer of ernie-hal's own random-weight
checkpoints (marker file `ernie_hal_tokenizer.json` holding `{"type": "bytes"}`). The chat template
comes from chat_template.jinja, tokenizer_config.json or chat_template.json; without one, ERNIE-4.5's
own template is used (docs/model.md section 7). Templates render in a sandboxed jinja2 environment set up
like transformers' (`raise_exception`, `strftime_now`, `tojson`, loop controls, `{% generation %}`).
"""

from __future__ import annotations

import json
import os
import re

from ..atomic import write_json

BYTE_MARKER = "ernie_hal_tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# ERNIE-4.5's template as its hub tokenizer_config.json has it: cls_token, then system "content\n",
# "User: content\n", "Assistant: content" + sep_token; other roles are skipped; the generation
# prompt "Assistant: " is on unless the caller turns it off.
ERNIE_CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}\n"
    "{%- if not cls_token is defined -%}{%- set cls_token = \"<|begin_of_sentence|>\" -%}{%- endif -%}\n"
    "{%- if not sep_token is defined -%}{%- set sep_token = \"<|end_of_sentence|>\" -%}{%- endif -%}\n"
    "{{- cls_token -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message[\"role\"] == \"user\" -%}{{- \"User: \" + message[\"content\"] + \"\\n\" -}}\n"
    "    {%- elif message[\"role\"] == \"assistant\" -%}{{- \"Assistant: \" + message[\"content\"] + sep_token -}}\n"
    "    {%- elif message[\"role\"] == \"system\" -%}{{- message[\"content\"] + \"\\n\" -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- \"Assistant: \" -}}{%- endif -%}"
)
END_OF_SENTENCE = "<|end_of_sentence|>"
# the byte tokenizer: these ids first, then the 256 byte values (264 ids: fits the tiny presets' 512)
BYTE_SPECIALS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", END_OF_SENTENCE,
                 "<mask:1>", "<mask:4>", "<mask:5>"]
BYTE_OFFSET = len(BYTE_SPECIALS)
# the named special tokens transformers knows; a config may name more (ERNIE: sys_start_token, ...)
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """The checkpoint's tokenizer files are missing or malformed."""


class NoTokenizerError(TokenizerError):
    """The directory has no tokenizer files at all (weights only)."""


class Tokenizer:
    """What every tokenizer offers. Subclasses fill in `_encode`, `_decode`, `token_to_id`, `vocab_size`."""

    def __init__(self, config: dict, chat_template: str | None):
        self.config = config                          # tokenizer_config.json (+ special_tokens_map.json)
        self.chat_template = chat_template or ERNIE_CHAT_TEMPLATE
        self._template = None

    # ---- named special tokens ------------------------------------------------------------------
    def token_text(self, key: str) -> str | None:
        """The text of a named special token (`"eos_token"` -> `"</s>"`) from the config."""
        return _text(self.config.get(key))

    def special_tokens_map(self) -> dict:
        """Every `*_token` the config names, as text: what transformers hands a chat template."""
        names = {k for k in self.config if k.endswith("_token")} | set(NAMED_TOKENS)
        return {k: t for k in sorted(names) if (t := self.token_text(k)) is not None}

    def _special_id(self, key: str, fallback: str) -> int | None:
        text = self.token_text(key)
        return self.token_to_id(text if text is not None else fallback)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token", "<s>")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token", "</s>")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token", "<unk>")     # ERNIE pads with <unk> = 0

    @property
    def stop_token_ids(self) -> tuple:
        """eos, plus <|end_of_sentence|> when the vocabulary has it (docs/model.md section 7)."""
        ids = (self.eos_token_id, self.token_to_id(END_OF_SENTENCE))
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    # ---- text <-> ids --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        """Ids of `text`. Special-token text inside it maps to its id. With `add_special_tokens`,
        bos/eos are added as tokenizer_config.json's `add_bos_token`/`add_eos_token` say (ERNIE: neither)."""
        ids = list(self._encode(text))
        if add_special_tokens:
            if self.config.get("add_bos_token") and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.config.get("add_eos_token") and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._decode([int(i) for i in ids], skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages` (dicts with "role" and, usually, "content"). Encode it
        with `add_special_tokens=False`: the template writes its own begin token."""
        if self._template is None:
            self._template = _compile(self.chat_template)
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise TokenizerError(f"message {i} must be a dict with a 'role', got {m!r}")
            chat.append({k: v for k, v in m.items() if v is not None})   # as transformers does
        from jinja2 import TemplateError
        try:
            return self._template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                         tools=kwargs.pop("tools", None), documents=kwargs.pop("documents", None),
                                         **{**self.special_tokens_map(), **kwargs})
        except TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None
        except Exception as e:      # a template can raise anything (1/0, a bad index, deep recursion)
            raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from None

    # ---- what subclasses fill in ---------------------------------------------------------------
    def _encode(self, text: str) -> list:
        raise NotImplementedError

    def _decode(self, ids: list, skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError


class StreamDecoder:
    """Incremental detokenization: `push(id)` returns only text that is now complete; `flush()`
    returns the rest. Each push decodes a short window: the last emitted tokens (context, so a
    decoder that strips a leading space or merges pieces sees what came before) plus the new ones;
    the new text is what the window adds beyond its context. A window ending in U+FFFD (an
    incomplete UTF-8 sequence or byte piece) is held back until it completes or until flush."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list = []
        self.prefix = 0     # window start: ids[prefix:read] were emitted already and give context
        self.read = 0       # ids[read:] are not emitted yet

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        context = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        if not final and (len(text) <= len(context) or text.endswith("\ufffd")):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(context):]


class HFTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` library (it splits out added and special tokens)."""

    def __init__(self, path: str, config: dict, chat_template):
        super().__init__(config, chat_template)
        from tokenizers import AddedToken, Tokenizer as Fast
        try:
            self.fast = Fast.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot be read as a tokenizers JSON file ({e})") from None
        # as transformers does: tokens the config declares but tokenizer.json lacks are added
        declared = [(e.get("content"), e.get("special", True)) for _, e in
                    sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))
                    if isinstance(e, dict)]
        declared += [(t, True) for t in self.special_tokens_map().values()]
        missing = [AddedToken(t, special=s, normalized=False) for t, s in dict(declared).items()
                   if t and self.fast.token_to_id(t) is None]
        if missing:
            self.fast.add_tokens(missing)
        self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and (
            type(self.fast.model).__name__ != "BPE"
            or config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))

    def encode(self, text, add_special_tokens=False):
        # transformers 5 ignores add_bos_token/add_eos_token when there is a tokenizer.json:
        # its post-processor alone decides what add_special_tokens adds
        return self.fast.encode(text, add_special_tokens=add_special_tokens).ids

    def _encode(self, text):
        return self.fast.encode(text, add_special_tokens=False).ids

    def _decode(self, ids, skip):
        text = self.fast.decode(ids, skip_special_tokens=skip)
        return _clean_up_tokenization(text) if self._clean_up else text

    def token_to_id(self, token):
        return self.fast.token_to_id(token)

    @property
    def vocab_size(self):
        return self.fast.get_vocab_size(with_added_tokens=True)


class _SplitSpecials:
    """Splits text on special-token strings (longest first) so each maps to its id."""

    specials: dict

    def _split(self, text):
        if not self.specials:
            return [(False, text)] if text else []
        if getattr(self, "_pattern", None) is None:
            self._pattern = re.compile(
                "(" + "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")")
        return [(part in self.specials, part) for part in self._pattern.split(text) if part]


class SentencePieceTokenizer(_SplitSpecials, Tokenizer):
    """tokenizer.model through sentencepiece. Special tokens: those tokenizer_config.json declares
    (named `*_token`s, `added_tokens_decoder`, `additional_special_tokens`) and the model's control
    pieces; text between them goes to sentencepiece.

    Two modes, as transformers' Llama tokenizer has them: `legacy` (the default, and what Baidu's own
    Ernie4_5_Tokenizer does) encodes and decodes each stretch with sentencepiece as is; with
    `"legacy": false` (ERNIE-4.5's config) no dummy "▁" is put before a stretch, except before the
    text's start when `add_prefix_space` is true, and decoding keeps every space."""

    def __init__(self, path: str, config: dict, chat_template):
        super().__init__(config, chat_template)
        try:
            import sentencepiece as spm
        except ImportError:
            raise TokenizerError(f"{path} needs the sentencepiece package: pip install sentencepiece") from None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:
            raise TokenizerError(f"{path}: not a valid sentencepiece model ({e})") from None
        self._n = self.sp.GetPieceSize()
        self.specials = {e["content"]: int(i) for i, e in (config.get("added_tokens_decoder") or {}).items()
                         if isinstance(e, dict) and e.get("content")}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        for t in [*self.special_tokens_map().values(), *(_text(t) for t in extra)]:
            if t and t not in self.specials and self._piece_id(t) is not None:
                self.specials[t] = self._piece_id(t)
        for i in range(self._n):
            if self.sp.IsControl(i):
                self.specials.setdefault(self.sp.IdToPiece(i), i)
        self._text_of = {v: k for k, v in self.specials.items()}
        self._skip = set(self.specials.values()) | {self.sp.unk_id()}
        self.legacy = config.get("legacy") is not False
        self.prefix_space = config.get("add_prefix_space", True) is not False
        self._unk_len = len(self.sp.EncodeAsIds("<unk>"))

    def _piece_id(self, piece):
        i = self.sp.PieceToId(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.IdToPiece(i) else i

    def _encode(self, text):
        ids = []
        for n, (special, part) in enumerate(self._split(text)):
            if special:
                ids.append(self.specials[part])
            elif self.legacy:
                ids.extend(self.sp.EncodeAsIds(part))
            else:   # encode behind "<unk>" and drop it: sentencepiece's dummy prefix lands on the <unk>
                part = " " + part if n == 0 and self.prefix_space else part
                ids.extend(self.sp.EncodeAsIds("<unk>" + part)[self._unk_len:])
        return ids

    def _decode(self, ids, skip):
        out, run = [], []
        for i in ids:
            if not 0 <= i < self._n:
                continue        # embedding rows past the vocabulary decode to nothing
            if i in self._skip:
                out.append(self._decode_run(run, first=not out))
                run = []
                if not skip:
                    out.append(self._text_of.get(i) or self.sp.IdToPiece(i))
            else:
                run.append(i)
        out.append(self._decode_run(run, first=not out))
        return "".join(out)

    def _decode_run(self, run, first):
        if self.legacy:
            return self.sp.DecodeIds(run)
        data = bytearray()
        for i in run:
            piece = self.sp.IdToPiece(i)
            data += bytes([int(piece[3:5], 16)]) if self.sp.IsByte(i) else piece.replace("\u2581", " ").encode()
        text = data.decode("utf-8", errors="replace")
        return text[1:] if first and self.prefix_space and text.startswith(" ") else text

    def token_to_id(self, token):
        return self.specials[token] if token in self.specials else self._piece_id(token)

    @property
    def vocab_size(self):
        return self._n


class ByteTokenizer(_SplitSpecials, Tokenizer):
    """UTF-8 bytes as ids len(specials)..len(specials)+255 after a few specials: for ernie-hal's
    random-weight checkpoints, which have no trained vocabulary."""

    def __init__(self, config: dict, chat_template, specials=BYTE_SPECIALS):
        super().__init__(config, chat_template)
        self.specials = {s: i for i, s in enumerate(specials)}
        self._names, self.offset = list(specials), len(specials)

    def _encode(self, text):
        ids = []
        for special, part in self._split(text):
            ids.extend([self.specials[part]] if special else [self.offset + b for b in part.encode("utf-8")])
        return ids

    def _decode(self, ids, skip):
        out, run = [], bytearray()
        for i in ids:
            if self.offset <= i < self.offset + 256:
                run.append(i - self.offset)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip and 0 <= i < self.offset:
                out.append(self._names[i])
            # ids past the byte range (the model's vocabulary is larger) decode to nothing
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token):
        return self.specials.get(token)

    @property
    def vocab_size(self):
        return self.offset + 256


def load_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer of a checkpoint directory; TokenizerError says which file is missing or bad."""
    if not os.path.isdir(directory):
        raise TokenizerError(f"{directory}: no such checkpoint directory")
    config = _read_json(os.path.join(directory, CONFIG_FILE))
    for key, value in _read_json(os.path.join(directory, "special_tokens_map.json")).items():
        config.setdefault(key, value)      # legacy layout: named tokens in a file of their own
    template = _chat_template(directory, config)
    fast = os.path.join(directory, "tokenizer.json")
    spm_model = os.path.join(directory, "tokenizer.model")
    marker = os.path.join(directory, BYTE_MARKER)
    if os.path.exists(fast):
        return HFTokenizer(fast, config, template)
    if os.path.exists(spm_model):
        return SentencePieceTokenizer(spm_model, config, template)
    if os.path.exists(marker):
        spec = _read_json(marker)
        specials = spec.get("specials", BYTE_SPECIALS)
        valid = isinstance(specials, list) and all(isinstance(t, str) for t in specials)
        if spec.get("type") != "bytes" or not valid:
            raise TokenizerError(f"{marker}: expected {{\"type\": \"bytes\", \"specials\": [...]}}, got {spec!r}")
        return ByteTokenizer(config, template, specials)
    raise NoTokenizerError(f"{directory} has no tokenizer: looked for tokenizer.json, tokenizer.model and "
                         f"{BYTE_MARKER}; copy the tokenizer files of the model next to its weights")


def write_byte_tokenizer(directory: str) -> None:
    """Make `directory` self-describing for the byte tokenizer (marker + config with the template)."""
    write_json(os.path.join(directory, BYTE_MARKER), {"type": "bytes", "offset": BYTE_OFFSET,
                                                       "specials": BYTE_SPECIALS})
    write_json(os.path.join(directory, CONFIG_FILE), {
        "tokenizer_class": "ErnieHalByteTokenizer", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>", "sep_token": END_OF_SENTENCE, "mask_token": "<mask:1>",
        "chat_template": ERNIE_CHAT_TEMPLATE})


def _chat_template(directory: str, config: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's, else chat_template.json's (transformers' order)."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    source, where = config.get("chat_template"), os.path.join(directory, CONFIG_FILE)
    if source is None:
        source = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
        where = os.path.join(directory, "chat_template.json")
    if isinstance(source, list):   # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if source is not None and not isinstance(source, str):
        raise TokenizerError(f"{where}: chat_template must be a string or a list of named templates")
    return source


def _compile(source: str):
    """A sandboxed jinja2 template with the helpers transformers gives chat templates."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):     # `{% generation %}...{% endgeneration %}` renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


def _text(token) -> str | None:
    """A token as configs write it: "text" or {"content": "text", ...} (an AddedToken)."""
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}); restore the file from the model repository") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
