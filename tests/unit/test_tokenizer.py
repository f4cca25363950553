"""Tokenizers from a checkpoint dir: tokenizer.json against transformers, sentencepiece, the byte
tokenizer, chat templates, streaming decode, stop tokens, errors."""

import io
import json

import pytest

from ernie_hal.core.model.tokenizer import (ERNIE_CHAT_TEMPLATE, ByteTokenizer, StreamDecoder, TokenizerError,
                                      load_tokenizer, write_byte_tokenizer)

CORPUS = ["Hello world, this is ERNIE.", "User: hi there\nAssistant: hello!", "The quick brown fox jumps over it.",
          "Unicode: café, 你好, 🙂", "numbers 12345 and symbols #$%",
          "a b c d e f g h i j k l m n o p q r s t u v w x y z"]
SPECIALS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]
# the named tokens of ERNIE-4.5's hub tokenizer_config.json
ERNIE_NAMES = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
               "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>"}
TEXTS = ["Hello world", "  two  spaces and\ttab\n", "Unicode: café 你好 🙂 zebra",
         "<|begin_of_sentence|>User: hi\nAssistant: ok<|end_of_sentence|> after", "a<mask:1>b", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again 🙂"}]


def _save(tok, d, **config):
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", **config}))
    return d


@pytest.fixture(scope="module")
def bytelevel_dir(tmp_path_factory):
    """GPT-2 style byte-level BPE, with ERNIE's template and named tokens in its config; the config
    names a mask token tokenizer.json lacks (transformers adds it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _save(tok, tmp_path_factory.mktemp("bytelevel"), add_bos_token=False, add_eos_token=False,
                 chat_template=ERNIE_CHAT_TEMPLATE, mask_token="<mask:1>", **ERNIE_NAMES)


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory):
    """Llama/ERNIE style tokenizer.json: "▁" for spaces, byte fallback, a decoder that strips the
    leading space of what it decodes; no chat template in its config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS + byte_pieces))
    return _save(tok, tmp_path_factory.mktemp("metaspace"), **ERNIE_NAMES)


@pytest.mark.parametrize("which", ["bytelevel_dir", "metaspace_dir"])
def test_tokenizer_json_matches_transformers(which, request):
    from transformers import AutoTokenizer
    d = request.getfixturevalue(which)
    ours, ref = load_tokenizer(str(d)), AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS:
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    template = None if which == "bytelevel_dir" else ERNIE_CHAT_TEMPLATE   # metaspace: ours is built in
    for prompt in (True, False):
        assert ours.apply_chat_template(CHAT, add_generation_prompt=prompt) == ref.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=prompt, chat_template=template)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 0)
    assert ours.stop_token_ids == (2, 4) and ours.vocab_size == len(ref)


@pytest.mark.parametrize("post_processor", [None, "<s> $A </s>"])
def test_add_special_tokens_follows_tokenizer_json_like_transformers(metaspace_dir, tmp_path, post_processor):
    # transformers 5 takes bos/eos from tokenizer.json's post-processor, not from add_bos_token
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer
    tok = Tokenizer.from_file(str(metaspace_dir / "tokenizer.json"))
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single=post_processor, special_tokens=[("<s>", 1),
                                                                                                  ("</s>", 2)])
    _save(tok, tmp_path, add_bos_token=True, add_eos_token=False, **ERNIE_NAMES)
    ours, ref = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    ids = ours.encode("Hello world", add_special_tokens=True)
    assert ids == ref.encode("Hello world") and (ids[0] == 1) == bool(post_processor)
    assert ours.encode("Hello world") == ref.encode("Hello world", add_special_tokens=False)


def test_stream_decoder_keeps_spaces_a_leading_space_stripping_decoder_drops(metaspace_dir):
    # decoding a token alone loses its "▁": the window must carry context; and byte-fallback
    # pieces of 🙂 / 你 arrive one byte at a time
    tok = load_tokenizer(str(metaspace_dir))
    text = "Hello world, the quick brown fox and 你好 🙂 again and again and again, zebra."
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text


def test_builtin_ernie_template_renders_exactly():
    tok = ByteTokenizer({}, None)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<|begin_of_sentence|>User: Hi\nAssistant: "
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == (
        "<|begin_of_sentence|>Be brief.\nUser: Hi\nAssistant: Hello<|end_of_sentence|>User: Again 🙂\n")
    assert tok.apply_chat_template(CHAT[:3]) == \
        "<|begin_of_sentence|>Be brief.\nUser: Hi\nAssistant: Hello<|end_of_sentence|>Assistant: "
    # the hub template skips roles it does not know; None-valued keys are dropped as transformers does
    assert tok.apply_chat_template([{"role": "tool", "content": "x"}, {"role": "user", "content": "y",
                                                                       "name": None}]) == \
        "<|begin_of_sentence|>User: y\nAssistant: "
    with pytest.raises(TokenizerError, match="must be a dict with a 'role'"):
        tok.apply_chat_template([{"text": "x"}])


@pytest.fixture(scope="module")
def spm_model():
    """A small sentencepiece model with byte fallback and ERNIE's two markers as user symbols."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 5), model_writer=buf, vocab_size=330,
                                   hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
                                   user_defined_symbols=["<|begin_of_sentence|>", "<|end_of_sentence|>"],
                                   minloglevel=2)
    return buf.getvalue(), spm.SentencePieceProcessor(model_proto=buf.getvalue())


def test_sentencepiece_legacy_mode_is_sentencepiece_per_stretch(spm_model, tmp_path):
    # no "legacy" key (the layout of Baidu's Ernie4_5_Tokenizer, which runs sentencepiece on each
    # stretch of text between the special tokens its config names)
    proto, sp = spm_model
    (tmp_path / "tokenizer.model").write_bytes(proto)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(ERNIE_NAMES))
    tok = load_tokenizer(str(tmp_path))
    eos = sp.PieceToId("<|end_of_sentence|>")
    assert tok.encode("Hello world<|end_of_sentence|>café 🙂") == \
        sp.EncodeAsIds("Hello world") + [eos] + sp.EncodeAsIds("café 🙂")
    text = "Hello world, café 🙂 zebra 你好"
    assert tok.decode(tok.encode(text)) == text
    assert tok.stop_token_ids == (sp.eos_id(), eos) and tok.vocab_size == sp.GetPieceSize()
    assert tok.decode(tok.encode(text) + [103_000]) == text      # embedding rows past the vocabulary


def test_sentencepiece_non_legacy_mode_keeps_every_space(spm_model, tmp_path):
    # ERNIE-4.5's config: legacy false, add_prefix_space false, its named tokens declared
    proto, sp = spm_model
    (tmp_path / "tokenizer.model").write_bytes(proto)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**ERNIE_NAMES, "legacy": False,
                                                                "add_prefix_space": False}))
    tok = load_tokenizer(str(tmp_path))
    text = " Hello world<|end_of_sentence|> after café 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == " Hello world after café 🙂"
    assert tok.encode("Hello") != sp.EncodeAsIds("Hello")       # no dummy "▁" before the text
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_byte_tokenizer_round_trips_unicode_and_specials(tmp_path):
    write_byte_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    text = "naïve 你好 🙂 𝔘 <|end_of_sentence|>"
    ids = tok.encode(text)
    assert max(ids) < tok.vocab_size <= 512 and tok.token_to_id("<|end_of_sentence|>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids + [511]) == "naïve 你好 🙂 𝔘 "           # ids past the bytes decode to nothing
    assert tok.stop_token_ids == (2, 4) and (tok.bos_token_id, tok.pad_token_id) == (1, 0)
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi")   # add_bos_token false
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<|begin_of_sentence|>User: Hi\nAssistant: "


def test_stream_decoder_holds_back_split_multibyte_characters(tmp_path):
    write_byte_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    text = "ab🙂你好, done. " * 3
    ids = tok.encode(text)
    ids.insert(6, tok.token_to_id("<|end_of_sentence|>"))      # a skipped special after 🙂
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces) and pieces[2:7] == ["", "", "", "🙂", ""]
    assert "".join(pieces) + stream.flush() == text
    # a sequence that never completes comes out, replaced, on flush
    stream = tok.stream_decoder()
    assert stream.push(tok.encode("é")[0]) == "" and stream.flush() == "\ufffd" and stream.flush() == ""


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match="no such checkpoint directory"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=f"{tmp_path} has no tokenizer: looked for tokenizer.json, "
                                             "tokenizer.model and ernie_hal_tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": 3}')
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat_template must be a string"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "ernie_hal_tokenizer.json").write_text('{"type": "words"}')
    with pytest.raises(TokenizerError, match="ernie_hal_tokenizer.json: expected"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be read"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model: not a valid sentencepiece model"):
        load_tokenizer(str(tmp_path))


def test_chat_template_files_and_template_errors(tmp_path):
    write_byte_tokenizer(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no ' + m['role']) }}{% endif %}"
        "{% generation %}[{{ m['content'] | tojson }}]{% endgeneration %}{% endfor %}{{ eos_token }}")
    tok = load_tokenizer(str(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '["é"]</s>'   # .jinja wins
    with pytest.raises(TokenizerError, match="chat template: no bad"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(TokenizerError, match="chat template does not compile"):
        load_tokenizer(str(tmp_path)).apply_chat_template([{"role": "user", "content": "x"}])
    # chat_template.json is read when neither the .jinja file nor tokenizer_config.json has one
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(ERNIE_NAMES))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert load_tokenizer(str(tmp_path)).apply_chat_template([{"role": "user", "content": "x"}]) == "x!"
