"""Tokenizers and chat templates from a checkpoint directory.

Order: `tokenizer.json` (HF `tokenizers`), else `tokenizer.model` (sentencepiece), else the
byte-level tokenizer of ernie-hal's own random-weight checkpoints (marker file
`ernie_hal_tokenizer.json`). The chat template comes from tokenizer_config.json,
chat_template.jinja or chat_template.json; without one, ERNIE-4.5's own template is used
(ernie45.md section 7).
"""

from __future__ import annotations

import json
import os
import re

BYTE_MARKER = "ernie_hal_tokenizer.json"

# ERNIE-4.5 -PT chat template (ernie45.md section 7): system "content\n", "User: ...\n",
# "Assistant: ...<|end_of_sentence|>", generation prompt "Assistant: ".
ERNIE_CHAT_TEMPLATE = (
    "{%- if add_generation_prompt is not defined %}{%- set add_generation_prompt = true %}{%- endif %}"
    "{{- '<|begin_of_sentence|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- 'Assistant: ' + message['content'] + '<|end_of_sentence|>' }}"
    "{%- else %}{{- raise_exception('unknown role ' + message['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant: ' }}{%- endif %}"
)
END_OF_SENTENCE = "<|end_of_sentence|>"
BYTE_SPECIALS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", END_OF_SENTENCE,
                 "<mask:1>", "<mask:4>", "<mask:5>"]
BYTE_OFFSET = len(BYTE_SPECIALS)


class TokenizerError(ValueError):
    """The checkpoint's tokenizer files are missing or malformed."""


class Tokenizer:
    """Common behaviour; subclasses implement _encode_plain, _id, _decode_ids and specials."""

    specials: dict          # special token text -> id
    config: dict            # tokenizer_config.json
    chat_template: str

    def __init__(self, config: dict, chat_template: str | None):
        self.config = config
        self.chat_template = chat_template or ERNIE_CHAT_TEMPLATE
        self._template = None

    # ---- ids of the named specials -------------------------------------------------------------
    def _special_id(self, key: str, default: int | None) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None:
            found = self.token_to_id(token)
            if found is not None:
                return found
        return default

    @property
    def bos_token_id(self):
        return self._special_id("bos_token", self.token_to_id("<s>"))

    @property
    def eos_token_id(self):
        return self._special_id("eos_token", self.token_to_id("</s>"))

    @property
    def pad_token_id(self):
        return self._special_id("pad_token", self.token_to_id("<unk>"))

    @property
    def stop_token_ids(self) -> tuple:
        """eos plus <|end_of_sentence|> when the vocabulary has it (ernie45.md section 7)."""
        ids = [self.eos_token_id, self.token_to_id(END_OF_SENTENCE)]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    # ---- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        ids = self._encode(text)
        if add_special_tokens:
            if self.config.get("add_bos_token") and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.config.get("add_eos_token") and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._decode(list(ids), skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, **extra) -> str:
        if self._template is None:
            self._template = _compile(self.chat_template)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i} must be an object with 'role' and 'content', got {m!r}")
        names = {k: self._token_text(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **names, **extra)

    def _token_text(self, key):
        token = self.config.get(key)
        return token.get("content") if isinstance(token, dict) else token

    # ---- subclass interface ------------------------------------------------------------------
    def token_to_id(self, token: str):
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError


class StreamDecoder:
    """Incremental detokenization: `push(id)` returns only newly completed text, holding back
    a trailing incomplete UTF-8 sequence or piece (shown as U+FFFD) until it completes."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list = []
        self.prefix = 0      # ids before this are fully emitted and no longer re-decoded
        self.emitted = ""    # text emitted from ids[prefix:]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.emitted):]
        self.emitted = text
        if len(self.ids) - self.prefix > 8:   # keep re-decoding short: restart the window
            self.prefix, self.emitted = len(self.ids), ""
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        new = text[len(self.emitted):]
        self.prefix, self.emitted = len(self.ids), ""
        return new


class HFTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` library (it handles added/special tokens)."""

    def __init__(self, path: str, config: dict, chat_template):
        super().__init__(config, chat_template)
        from tokenizers import Tokenizer as Fast
        try:
            self.fast = Fast.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot be read as a tokenizers JSON file ({e})") from None

    def _encode(self, text):
        return self.fast.encode(text, add_special_tokens=False).ids

    def _decode(self, ids, skip):
        return self.fast.decode(ids, skip_special_tokens=skip)

    def token_to_id(self, token):
        return self.fast.token_to_id(token)

    @property
    def vocab_size(self):
        return self.fast.get_vocab_size(with_added_tokens=True)


class _SplitSpecials:
    """Splits text on special-token strings so they map to their ids, not to pieces."""

    def _split(self, text):
        if not self.specials:
            return [(False, text)]
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")"
        return [(part in self.specials, part) for part in re.split(pattern, text) if part]


class SentencePieceTokenizer(_SplitSpecials, Tokenizer):
    """tokenizer.model through sentencepiece; added tokens from tokenizer_config.json."""

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
        self.specials = {}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if content:
                self.specials[content] = int(key)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = self._token_text(key)
            if text and text not in self.specials and self.sp.PieceToId(text) != self.sp.unk_id():
                self.specials[text] = self.sp.PieceToId(text)
        for i in range(self.sp.GetPieceSize()):
            # control pieces and <...> symbols (user-defined; the Python API has no test for
            # that type) are matched as whole tokens, never split into pieces
            piece = self.sp.IdToPiece(i)
            if self.sp.IsControl(i) or (piece.startswith("<") and piece.endswith(">") and len(piece) > 2
                                        and not self.sp.IsByte(i)):
                self.specials.setdefault(piece, i)
        self._special_ids = set(self.specials.values()) | {self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()}
        # ERNIE's config says add_prefix_space=False: no dummy "▁" before a text segment
        # (done the way HF's non-legacy Llama tokenizer does: encode behind <unk>, drop it)
        self.prefix_space = bool(config.get("add_prefix_space", False)) or config.get("legacy") is True
        self._unk_len = len(self.sp.EncodeAsIds("<unk>"))

    def _encode_part(self, part):
        if self.prefix_space:
            return self.sp.EncodeAsIds(part)
        ids = self.sp.EncodeAsIds("<unk>" + part)
        return ids[self._unk_len:]

    def _encode(self, text):
        ids = []
        for special, part in self._split(text):
            ids.extend([self.specials[part]] if special else self._encode_part(part))
        return ids

    def _decode(self, ids, skip):
        by_id = {v: k for k, v in self.specials.items()}
        out, run = [], []
        for i in ids:
            if i in by_id or i in self._special_ids:
                out.append(self.sp.DecodeIds(run))
                run = []
                if not skip:
                    out.append(by_id.get(i) or self.sp.IdToPiece(i))
            else:
                run.append(i)
        out.append(self.sp.DecodeIds(run))
        return "".join(out)

    def token_to_id(self, token):
        if token in self.specials:
            return self.specials[token]
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(self.sp.unk_id()) else i

    @property
    def vocab_size(self):
        return self.sp.GetPieceSize()


class ByteTokenizer(_SplitSpecials, Tokenizer):
    """UTF-8 bytes as ids BYTE_OFFSET..BYTE_OFFSET+255 after a few specials: for ernie-hal's
    random-weight checkpoints, which have no trained vocabulary."""

    def __init__(self, config: dict, chat_template):
        super().__init__(config, chat_template)
        self.specials = {s: i for i, s in enumerate(BYTE_SPECIALS)}

    def _encode(self, text):
        ids = []
        for special, part in self._split(text):
            ids.extend([self.specials[part]] if special else [BYTE_OFFSET + b for b in part.encode("utf-8")])
        return ids

    def _decode(self, ids, skip):
        out, run = [], bytearray()
        for i in ids:
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                run.append(i - BYTE_OFFSET)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip and 0 <= i < BYTE_OFFSET:
                out.append(BYTE_SPECIALS[i])
            # ids above the byte range (the model's vocab is larger) decode to nothing
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token):
        return self.specials.get(token)

    @property
    def vocab_size(self):
        return BYTE_OFFSET + 256


def load_tokenizer(directory: str) -> Tokenizer:
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    template = _chat_template(directory, config)
    fast = os.path.join(directory, "tokenizer.json")
    spm_model = os.path.join(directory, "tokenizer.model")
    if os.path.exists(fast):
        return HFTokenizer(fast, config, template)
    if os.path.exists(spm_model):
        return SentencePieceTokenizer(spm_model, config, template)
    if os.path.exists(os.path.join(directory, BYTE_MARKER)):
        return ByteTokenizer(config, template)
    raise TokenizerError(f"{directory} has no tokenizer: looked for tokenizer.json, tokenizer.model and "
                         f"{BYTE_MARKER}; copy the tokenizer files of the model next to its weights")


def write_byte_tokenizer(directory: str) -> None:
    """Make `directory` self-describing for the byte tokenizer (marker + config with template)."""
    _write_json(os.path.join(directory, BYTE_MARKER), {"type": "bytes", "offset": BYTE_OFFSET,
                                                       "specials": BYTE_SPECIALS})
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "ErnieHalByteTokenizer", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
        "chat_template": ERNIE_CHAT_TEMPLATE})


def _chat_template(directory: str, config: dict):
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    as_json = os.path.join(directory, "chat_template.json")
    if os.path.exists(as_json):
        return _read_json(as_json).get("chat_template")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}); restore the file from the model repository") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
