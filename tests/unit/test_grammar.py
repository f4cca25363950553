"""Grammar-constrained decoding below the server (core/runtime/grammar.py on xgrammar): the
vocabulary of every tokenizer kind handed to the grammar engine (a constrained walk under random
logits decodes, through the tokenizer itself, to JSON that validates); the random default model's
output always parses and validates; finish reasons; the compiled-grammar cache; bad schemas;
constrained sequences through the scheduler under preemption, chunked prefill and prefix caching
give the same tokens as alone; `Model.generate(json_schema=...)` and `generate --json-schema`."""

import json

import jsonschema
import pytest
import torch

import ernie_hal
from ernie_hal.core.model.tokenizer import load_tokenizer, write_byte_tokenizer
from ernie_hal.core.runtime.engine import Engine
from ernie_hal.core.runtime.grammar import GrammarError, Grammars, GrammarSpec, mask_logits
from ernie_hal.core.runtime.sampling import SamplingParams
from ernie_hal.core.runtime.scheduler import Request, Scheduler

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
    "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"]},
    "score": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "boolean"}]},
}, "required": ["name", "age", "role", "tags", "address", "score"]}


@pytest.fixture(scope="module")
def model():
    return ernie_hal.load(None, device="cpu", dtype="fp32")


def _walk(grammars, spec, tokenizer, seed, steps=400) -> str:
    """Sample under the grammar from random logits until it finishes; the tokenizer's decoding."""
    g = torch.Generator().manual_seed(seed)
    state, ids = grammars.state(spec), []
    for _ in range(steps):
        logits = torch.randn(1, grammars.vocab_size, generator=g)
        token = int(torch.argmax(mask_logits(logits, [state])[0]))
        state.accept(token)
        ids.append(token)
        if state.finished():
            return tokenizer.decode(ids)
    raise AssertionError(f"the grammar did not finish in {steps} tokens: {tokenizer.decode(ids)!r}")


def _tokenizer_dir(kind, tmp_path_factory):
    """A checkpoint dir with a tokenizer of `kind`, as tests/unit/test_tokenizer.py builds them."""
    d = tmp_path_factory.mktemp(kind)
    corpus = ['{"name": "x", "age": 12, "tags": ["ab"]}', "Hello world, café 你好 🙂 12345 true false null",
              "The quick brown fox jumps over the lazy dog."] * 5
    specials = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    if kind == "bytes":
        write_byte_tokenizer(str(d))
        return d
    if kind == "sentencepiece":
        spm = pytest.importorskip("sentencepiece")
        import io
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=400,
                                       hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
                                       user_defined_symbols=["<|end_of_sentence|>"], minloglevel=2)
        (d / "tokenizer.model").write_bytes(buf.getvalue())
        (d / "tokenizer_config.json").write_text(json.dumps(names))
        return d
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:   # metaspace: "▁" for spaces and byte fallback, like ERNIE-4.5's tokenizer.json
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                         decoders.ByteFallback(), decoders.Fuse()])
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", **names}))
    return d


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece", "bytelevel", "metaspace"])
def test_every_tokenizer_kind_hands_its_vocabulary_to_the_grammar(kind, tmp_path_factory):
    tok = load_tokenizer(str(_tokenizer_dir(kind, tmp_path_factory)))
    vocab = tok.vocab_size + 40            # the model's logits are wider than the vocabulary, as ERNIE's are
    grammars = Grammars(tok, vocab, tok.stop_token_ids)
    spec = GrammarSpec.json_schema(PERSON)
    for seed in range(6):
        text = _walk(grammars, spec, tok, seed)
        jsonschema.validate(json.loads(text), PERSON)       # json.loads: no raw control characters


def test_json_is_compact_so_a_model_cannot_loop_on_whitespace(model):
    tok = model.tokenizer
    state = model.grammars.state(GrammarSpec("json_object"))
    for token in tok.encode('{"k": [1, '):
        state.accept(token)
    allowed = torch.isfinite(mask_logits(torch.zeros(1, model.config.vocab_size), [state])[0])
    assert not any(allowed[t] for t in tok.encode(" \n\t\r"))     # no whitespace after ", "
    assert allowed[tok.encode("2")[0]] and allowed[tok.encode('"')[0]]


def test_masked_rows_allow_only_grammar_tokens_and_free_rows_are_untouched(model):
    grammars = model.grammars
    logits = torch.randn(3, model.config.vocab_size)
    state = grammars.state(GrammarSpec.choice(["yes", "no"]))
    out = mask_logits(logits, [None, state, None])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert allowed == sorted(model.tokenizer.encode("y") + model.tokenizer.encode("n"))
    assert mask_logits(logits, [None, None, None]) is None


def test_default_model_output_always_parses_and_validates(model):
    outs = model.generate(["a", "person please", "x" * 30], max_new_tokens=200, temperature=1.0, seed=3,
                          json_schema=PERSON)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), PERSON)


def test_cut_by_max_tokens_is_length_and_a_finished_grammar_stops_at_once(model):
    out = model.generate("a", max_new_tokens=5, temperature=0, json_schema=PERSON)
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    # the grammar completes on its last character: no stop token is sampled after it
    out = model.generate("a", max_new_tokens=50, temperature=0, grammar=GrammarSpec.choice(["abc"]))
    assert (out.text, out.finish_reason, len(out.token_ids)) == ("abc", "stop", 3)


def test_compiled_grammars_are_cached_by_spec(model):
    grammars = model.grammars
    a = grammars.compile(GrammarSpec.json_schema({"type": "object", "properties": {"k": {"type": "integer"}}}))
    b = grammars.compile(GrammarSpec.json_schema('{"type": "object", "properties": {"k": {"type": "integer"}}}'))
    assert a is b


@pytest.mark.parametrize("spec, words", [
    (lambda: GrammarSpec.json_schema({"type": "strin"}), "Unsupported type"),
    (lambda: GrammarSpec.json_schema({"not": {"type": "string"}}), "keyword 'not' at #"),
    (lambda: GrammarSpec.json_schema({"type": "object", "properties": {"a": {"uniqueItems": True}}}),
     "keyword 'uniqueItems' at #/properties/a"),
    (lambda: GrammarSpec.json_schema("{not json"), "not valid JSON"),
    (lambda: GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "does not compile"),
    (lambda: GrammarSpec("regex", "(("), "The parenthesis is not closed"),
    (lambda: GrammarSpec("ebnf", "root ::= undefined_rule"), 'Rule "undefined_rule" is not defined'),
    (lambda: GrammarSpec.choice([]), "non-empty list"),
])
def test_bad_grammars_name_the_problem(model, spec, words):
    with pytest.raises(GrammarError, match=words) as e:
        model.grammars.compile(spec())
    assert "/project/cpp" not in str(e.value) and ".cc:" not in str(e.value)


def _run(model, prompts, specs, num_blocks, max_batched, prefix_caching=False):
    """Greedy outputs of `prompts` through a scheduler (constrained where specs[i] is set)."""
    engine = Engine(model.model, stop_token_ids=model.tokenizer.stop_token_ids, graphs=False,
                    prefix_caching=prefix_caching)
    engine.ensure_kv(num_blocks)
    sched = Scheduler(engine, max_num_seqs=8, max_num_batched_tokens=max_batched)
    seqs = []
    for i, (p, spec) in enumerate(zip(prompts, specs)):
        s = engine.new_sequence(model.tokenizer.encode(p), SamplingParams(max_new_tokens=40, temperature=0))
        s.grammar = model.grammars.state(spec) if spec is not None else None
        seqs.append(s)
        sched.add(Request(f"r{i}", [s]))
    with torch.inference_mode():
        while sched.has_work():
            sched.step()
    return [(s.output_ids, s.finish_reason) for s in seqs], sched.num_preemptions


def test_constrained_sequences_survive_preemption_chunked_prefill_and_prefix_caching(model):
    # two blocks of common prefix (shared through the prefix cache), then each its own text
    prompts = ["a shared prefix of two blocks:: " + f"then the {i}th prompt's own words, all different" for i in range(4)]
    spec = GrammarSpec.json_schema({"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 6}, "b": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                      "maximum": 99},
                                                      "maxItems": 2}}, "required": ["a", "b"]})
    specs = [spec if i % 2 == 0 else None for i in range(4)]
    roomy, none = _run(model, prompts, specs, num_blocks=200, max_batched=512)
    tight, preemptions = _run(model, prompts, specs, num_blocks=10, max_batched=16, prefix_caching=True)
    assert none == 0 and preemptions > 0
    assert tight == roomy
    for (ids, reason), s in zip(roomy, specs):
        if s is not None:
            assert reason == "stop"
            json.loads(model.decode(ids))


def test_cli_generate_json_schema(tmp_path, capsys):
    from ernie_hal.cli.main import main
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON))
    assert main(["generate", "hi", "--json-schema", str(schema), "--device", "cpu", "--dtype", "fp32",
                 "--max-new-tokens", "200", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["finish_reason"] == "stop"
    jsonschema.validate(json.loads(payload["text"]), PERSON)
    (tmp_path / "bad.json").write_text("{oops")
    assert main(["generate", "hi", "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "--json-schema" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"type": "strin"}')
    assert main(["generate", "hi", "--json-schema", str(tmp_path / "bad.json"), "--device", "cpu"]) == 2
    assert "Unsupported type" in capsys.readouterr().err


def test_a_grammar_no_token_can_continue_ends_its_sequence_as_cut(model):
    # JSON vocabularies hold no control characters, so a pattern that needs a raw newline dead-ends
    spec = GrammarSpec.json_schema({"type": "string", "pattern": "^a\n$"})
    out = model.generate("x", max_new_tokens=10, temperature=0, grammar=spec)
    assert (out.finish_reason, out.text) == ("length", '"a')
