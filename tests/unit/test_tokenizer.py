"""Tokenizers from a checkpoint dir: tokenizer.json (against transformers), sentencepiece,
the byte tokenizer, chat templates, streaming decode, stop tokens, errors."""

import io
import json

import pytest

from ernie_hal.core.tokenizer import (ERNIE_CHAT_TEMPLATE, ByteTokenizer, TokenizerError, load_tokenizer,
                                      write_byte_tokenizer)

CORPUS = ["Hello world, this is ERNIE.", "User: hi there\nAssistant: hello!", "The quick brown fox jumps.",
          "Unicode: café, 你好, 🙂", "numbers 12345 and symbols #$%"] * 20
SPECIALS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]


@pytest.fixture(scope="module")
def fast_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("fast")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
        "chat_template": ERNIE_CHAT_TEMPLATE}))
    return d


def test_fast_tokenizer_matches_transformers(fast_dir):
    from transformers import AutoTokenizer
    ours, ref = load_tokenizer(str(fast_dir)), AutoTokenizer.from_pretrained(str(fast_dir))
    for text in ["Hello world", "Unicode: café 你好 🙂", "<|begin_of_sentence|>User: hi\nAssistant: "]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False),
                                                              skip_special_tokens=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    assert ours.stop_token_ids == (2, 4) and ours.bos_token_id == 1


def test_builtin_ernie_template_renders_exactly():
    tok = ByteTokenizer({}, None)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<|begin_of_sentence|>User: Hi\nAssistant: "
    multi = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert tok.apply_chat_template(multi, add_generation_prompt=False) == \
        "<|begin_of_sentence|>S\nUser: a\nAssistant: b<|end_of_sentence|>User: c\n"
    with pytest.raises(TokenizerError, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(TokenizerError, match="'role' and 'content'"):
        tok.apply_chat_template([{"text": "x"}])


def test_sentencepiece_model_round_trips(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=320,
                                   user_defined_symbols=["<|begin_of_sentence|>", "<|end_of_sentence|>"],
                                   character_coverage=1.0, byte_fallback=True, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    tok = load_tokenizer(str(tmp_path))
    text = "Hello world, café 🙂"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|begin_of_sentence|>User: hi")
    assert ids[0] == tok.token_to_id("<|begin_of_sentence|>")
    assert tok.token_to_id("<|end_of_sentence|>") in tok.stop_token_ids


def test_byte_tokenizer_round_trips_unicode_and_specials(tmp_path):
    write_byte_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    text = "naïve 你好 🙂 <|end_of_sentence|>"
    ids = tok.encode(text)
    assert max(ids) < 512 and tok.token_to_id("<|end_of_sentence|>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "naïve 你好 🙂 "
    assert tok.stop_token_ids == (2, 4)


def test_stream_decoder_holds_back_split_multibyte_characters(tmp_path):
    write_byte_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    text = "ab🙂你好, done. " * 3
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in tok.encode(text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match="looked for tokenizer.json, tokenizer.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(str(tmp_path))


def test_chat_template_file_takes_precedence(tmp_path):
    write_byte_tokenizer(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_tokenizer(str(tmp_path)).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
