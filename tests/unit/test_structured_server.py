"""Structured outputs and tool calls through the OpenAI-compatible server, driven by the real
`openai` client against the embedded random-weight default model (the grammar, not the weights,
makes the output valid): response_format json_object / json_schema on chat and completions,
streamed and not, n > 1, pydantic `parse`; vLLM's guided_*; tools with tool_choice
none/auto/required/named, streamed as tool-call deltas; ERNIE's <tool_call> format parsed;
role "tool" follow-ups rendered; bad schemas and grammars 400; free requests keep their greedy
tokens when constrained ones share their batches."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pydantic
import pytest

import ernie_hal
from ernie_hal.core.model.tokenizer import ERNIE_CHAT_TEMPLATE, ByteTokenizer
from ernie_hal.serve import build_server
from ernie_hal.serve.protocol import ChatCompletionRequest
from ernie_hal.serve.tools import parse_tool_calls, rewrite_stream, template_messages, tool_plan

NAME = "tiny-moe"
# small bounded schemas: a random model finishes each within max_tokens
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -3,
                                                                         "maximum": 40}},
     "required": ["ok", "n"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "name": {"type": "string", "minLength": 1, "maxLength": 3}},
     "required": ["color", "name"]},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9},
                                             "minItems": 1, "maxItems": 3}}, "required": ["xs"]},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {
        "k": {"type": "string", "maxLength": 2}}, "required": ["k"]}}, "required": ["inner"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5},
                                                      {"type": "string", "maxLength": 2}]}}, "required": ["v"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["x"]},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 2},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                     "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def model():
    return ernie_hal.load(None, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def url(model, serve_in_thread):
    with serve_in_thread(build_server(model, NAME, max_num_seqs=32, max_num_batched_tokens=512)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def _fmt(schema, name="out"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_50_requests_over_a_mix_of_schemas_parse_and_validate(client):
    def one(i):
        schema = SCHEMAS[i % len(SCHEMAS)]
        if i % 3 == 2:      # legacy completions take response_format too
            r = client.completions.create(model=NAME, prompt=f"request {i}", max_tokens=60, temperature=1.0,
                                          seed=i, extra_body={"response_format": _fmt(schema)})
            return schema, r.choices[0].text, r.choices[0].finish_reason
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"request {i}"}],
                                           max_tokens=60, temperature=1.0, seed=i, response_format=_fmt(schema))
        return schema, r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(25) as pool:
        results = list(pool.map(one, range(50)))
    for schema, text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_n_choices_and_the_stream_concatenates_to_valid_json(client):
    # any JSON object: nothing bounds its numbers, so a random model may run on digits until
    # max_tokens cuts it, which it then says ("length"); what stops is an object
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}], n=3,
                                       max_tokens=40, temperature=1.0, seed=1, response_format={"type": "json_object"})
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "length" or isinstance(json.loads(c.message.content), dict)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=40, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and json.loads(r.choices[0].message.content) == {"": True}
    schema = SCHEMAS[1]
    texts, finish = {}, {}
    for chunk in client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "s"}], n=2,
                                                max_tokens=60, temperature=1.0, seed=2, stream=True,
                                                response_format=_fmt(schema)):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert finish == {0: "stop", 1: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), schema)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="x", max_tokens=60, stream=True, temperature=0,
        extra_body={"response_format": _fmt(SCHEMAS[2])}))
    jsonschema.validate(json.loads(text), SCHEMAS[2])


def test_cut_by_max_tokens_finishes_with_length(client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, response_format=_fmt(SCHEMAS[1]))
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_pydantic_parse(client):
    class Item(pydantic.BaseModel):
        label: str = pydantic.Field(max_length=4)
        count: int = pydantic.Field(ge=0, le=9)
        kind: str = pydantic.Field(json_schema_extra={"enum": ["a", "b"]})

    r = client.beta.chat.completions.parse(model=NAME, messages=[{"role": "user", "content": "an item"}],
                                           max_tokens=60, temperature=0, response_format=Item)
    item = r.choices[0].message.parsed
    assert isinstance(item, Item) and len(item.label) <= 4 and 0 <= item.count <= 9 and item.kind in ("a", "b")


def test_vllm_guided_fields(client):
    def chat(**extra):
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "go"}], max_tokens=40,
                                           temperature=1.0, seed=5, extra_body=extra)
        return r.choices[0].message.content, r.choices[0].finish_reason

    text, finish = chat(guided_json=SCHEMAS[0])
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS[0])
    text, finish = chat(guided_regex=r"[a-c]{2,4}-[0-9]{3}")
    assert finish == "stop" and re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", text)
    assert chat(guided_choice=["alpha", "beta", "gamma"]) in [(w, "stop") for w in ("alpha", "beta", "gamma")]
    text, finish = chat(guided_grammar='root ::= "(" [0-9] (", " [0-9])* ")"')
    assert finish == "stop" and re.fullmatch(r"\(\d(, \d)*\)", text), text


def _args_valid(call, tool):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_and_required_tool_choice_return_valid_tool_calls(client):
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER, CLOCK], max_tokens=60,
                                       temperature=1.0, seed=3, n=2,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        _args_valid(c.message.tool_calls[0], WEATHER)
    r = client.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER, CLOCK], max_tokens=80,
                                       temperature=1.0, seed=4, tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    _args_valid(call, {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name])


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_time"}}, "required"])
def test_streamed_tool_calls_reassemble(client, choice):
    calls, finish = {}, None
    for chunk in client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "time?"}],
                                                tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=80,
                                                temperature=0, stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = d.id or slot["id"]
                slot["name"] += (d.function.name or "") if d.function else ""
                slot["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("call_")
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call["name"]]
    jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])


def test_auto_parses_ernie_tool_call_format_from_the_model_output(client):
    # the model's output fixed by a grammar: ERNIE's tag format, which "auto" parses into tool_calls
    fixed = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n' \
            '</tool_call>'
    ask = dict(model=NAME, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER], max_tokens=200,
               temperature=0, extra_body={"guided_choice": [fixed]})
    r = client.chat.completions.create(**ask)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content == "Let me check."
    assert m.tool_calls[0].function.name == "get_weather"
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "c"}
    content, args = "", None
    for chunk in client.chat.completions.create(**ask, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                args = d.function.arguments
    assert content.strip() == "Let me check." and json.loads(args) == {"city": "Paris", "unit": "c"}
    # no call in the text: plain content; tool_choice none: never parsed
    r = client.chat.completions.create(**{**ask, "extra_body": {"guided_choice": ["sunny"]}})
    assert r.choices[0].message.content == "sunny" and not r.choices[0].message.tool_calls
    r = client.chat.completions.create(**ask, tool_choice="none")
    assert r.choices[0].message.content == fixed and r.choices[0].finish_reason == "stop"


def test_ernie_tool_call_parser_on_fixed_outputs():
    text = 'a<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n<tool_call>\n{"name": "g", ' \
           '"arguments": "{\\"y\\": 2}"}\n</tool_call>'
    assert parse_tool_calls(text) == ("a", [{"name": "f", "arguments": '{"x": 1}'},
                                            {"name": "g", "arguments": '{"y": 2}'}])
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}') == (None, [{"name": "f", "arguments": "{}"}])


def test_streamed_auto_holds_back_a_partial_tag():
    import asyncio
    plan = tool_plan(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=[WEATHER]))
    pieces = ["Hi <", "tool", "_call>", '{"name": "get_weather", ', '"arguments": {"city": "A", "unit": "f"}}',
              "</tool_call>"]

    async def lines():
        yield 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
        for i, p in enumerate(pieces):
            finish = "stop" if i == len(pieces) - 1 else None
            yield f'data: {json.dumps({"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": finish}]})}\n\n'
        yield "data: [DONE]\n\n"

    async def collect():
        return [line async for line in rewrite_stream(lines(), plan)]

    out = [json.loads(x[6:]) for x in asyncio.run(collect()) if x.startswith("data: {")]
    deltas = [o["choices"][0]["delta"] for o in out]
    assert "".join(d.get("content") or "" for d in deltas) == "Hi "
    assert deltas[-1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                       "arguments": '{"city": "A", "unit": "f"}'}
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_follow_up_turns_render(client):
    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    req = ChatCompletionRequest(messages=history, tools=[WEATHER])
    base = [{"role": m["role"], "content": m["content"] or ""} for m in history]
    # ERNIE's base template knows no tools: the turns are written as tags, nothing is dropped
    tok = ByteTokenizer({}, ERNIE_CHAT_TEMPLATE)
    text = tok.apply_chat_template(template_messages(req, base, native=False))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in text
    assert "User: <tool_response>\n21 degrees\n</tool_response>\n" in text
    # a template that renders tools gets the fields as they are
    native = ("{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}{% for m in messages %}"
              "{% if m.tool_calls %}{% for c in m.tool_calls %}<call {{ c.function.name }} "
              "{{ c.function.arguments | tojson }}>{% endfor %}{% elif m.role == 'tool' %}<result "
              "{{ m.tool_call_id }}: {{ m.content }}>{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}")
    tok = ByteTokenizer({}, native)
    text = tok.apply_chat_template(template_messages(req, base, native=True), tools=[WEATHER])
    assert text == ('[tool get_weather]user: weather in Paris?\n<call get_weather {"city": "Paris", "unit": "c"}>'
                    '<result call_1: 21 degrees>')
    r = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, words", [
    ({"response_format": _fmt({"type": "strin"})}, "Unsupported type"),
    ({"response_format": _fmt({"type": "object", "properties": {"a": {"not": {}}}})}, "keyword 'not'"),
    ({"response_format": {"type": "json_schema"}}, "json_schema must be an object"),
    ({"response_format": {"type": "yaml"}}, "type 'yaml' is not supported"),
    ({"response_format": "json"}, "response_format must be an object"),
    ({"guided_regex": "(("}, "guided_regex: the regex does not compile"),
    ({"guided_grammar": "root ::= nothing"}, 'Rule "nothing" is not defined'),
    ({"guided_choice": []}, "non-empty list"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "at most one of"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0] must be"),
    ({"tools": [WEATHER, WEATHER]}, "given twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "integer",
                                                                            "uniqueItems": True}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "cannot be combined"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
])
def test_bad_schemas_and_grammars_are_400(url, body, words):
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"], r.json()
    if ("response_format" in body or "guided_regex" in body) and "tools" not in body:
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": NAME, "prompt": "x", "max_tokens": 4, **body})
        assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_free_requests_keep_their_greedy_tokens_beside_constrained_ones(url, model):
    prompts = [f"free prompt number {i} with its own text" for i in range(8)]
    alone = [model.generate(p, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids for p in prompts]

    def free(i):
        r = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": NAME, "prompt": prompts[i], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True})
        return r.json()["choices"][0]["token_ids"]

    def constrained(i):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
            "model": NAME, "messages": [{"role": "user", "content": f"c{i}"}], "max_tokens": 40, "temperature": 1.0,
            "seed": i, "response_format": _fmt(SCHEMAS[i % len(SCHEMAS)])})
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(16) as pool:
        frees = [pool.submit(free, i) for i in range(8)]
        held = [pool.submit(constrained, i) for i in range(8)]
        assert [f.result() for f in frees] == alone
        for i, h in enumerate(held):
            jsonschema.validate(json.loads(h.result()), SCHEMAS[i % len(SCHEMAS)])
