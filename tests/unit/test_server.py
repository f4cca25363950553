"""The OpenAI-compatible server on the embedded default model (fp32 so greedy is exact), run
in-process under uvicorn on a free loopback port, driven by the real `openai` client and by
httpx: chat, completions, streaming, n > 1, stop strings, usage, seeds; 64 concurrent streams
against one-at-a-time runs; every bad input; KV blocks freed when a client disconnects."""

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

import ernie_hal
from ernie_hal.serve import build_server
from ernie_hal.serve.text import TextStream

KEY = "test-key"
NAME = "tiny-moe"


@pytest.fixture(scope="module")
def model():
    return ernie_hal.load(None, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def url(model, serve_in_thread):
    with serve_in_thread(build_server(model, NAME, max_num_seqs=64, max_num_batched_tokens=512, api_key=KEY)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def metrics(url) -> dict:
    out = {}
    for line in httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(url, timeout=10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        if m["ernie_hal_num_requests_running"] == 0 and m["ernie_hal_num_requests_waiting"] == 0 \
                and m["ernie_hal_kv_cache_free_blocks"] == m["ernie_hal_kv_cache_blocks"]:
            return m
        assert time.time() < deadline, f"KV blocks not freed: {m}"
        time.sleep(0.02)


def post(url, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(f"{url}{path}", content=raw, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


# ---- the happy paths, through the openai client -------------------------------------------------
def test_health_models_metrics(url, client):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{url}/metrics").status_code == 401      # --api-key guards /metrics too
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("requests_total", "prompt_tokens_total", "generation_tokens_total", "num_requests_waiting",
                 "num_requests_running", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "kv_cache_usage_ratio", "kv_cache_free_blocks"):
        assert f"ernie_hal_{name}" in text


def test_chat_completion(client, model):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    prompt = model.encode([{"role": "user", "content": "Hello there"}], chat=True)
    want = model.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 8, len(prompt) + 8)


def test_completion_matches_the_engine(client, model):
    r = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    want = model.generate("The quick brown fox", max_new_tokens=12, temperature=0, ignore_eos=True)
    assert r.choices[0].text == want.text and r.choices[0].model_extra["token_ids"] == want.token_ids
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 12


def test_penalties_reach_the_sampler(client, model):
    """OpenAI's presence/frequency penalties and vLLM's repetition_penalty: the server's tokens
    equal the engine's with the same penalties."""
    kw = dict(max_new_tokens=16, temperature=0, ignore_eos=True)
    r = client.completions.create(model=NAME, prompt="aaaa", max_tokens=16, temperature=0, frequency_penalty=1.5,
                                  presence_penalty=0.5, extra_body={"ignore_eos": True, "return_token_ids": True,
                                                                    "repetition_penalty": 1.3})
    want = model.generate("aaaa", frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3, **kw)
    assert r.choices[0].model_extra["token_ids"] == want.token_ids
    assert want.token_ids != model.generate("aaaa", **kw).token_ids


def test_min_p_reaches_the_sampler(client, model):
    """vLLM's min_p: a seeded request gives the engine's tokens with the same min_p (and seed)."""
    kw = dict(temperature=1.0, top_p=1.0, seed=11)
    r = client.completions.create(model=NAME, prompt="mmm", max_tokens=12, extra_body={
        "ignore_eos": True, "return_token_ids": True, "min_p": 0.3}, **kw)
    want = model.generate("mmm", max_new_tokens=12, ignore_eos=True, min_p=0.3, **kw)
    assert r.choices[0].model_extra["token_ids"] == want.token_ids


def test_chat_logprobs_match_the_engine(client, model):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = r.choices[0]
    ids = choice.model_extra["token_ids"]
    content = choice.logprobs.content
    assert len(content) == len(ids) == 6
    prompt = model.encode([{"role": "user", "content": "hi"}], chat=True)
    want = model.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    for entry, (lp, top), token in zip(content, want.logprobs, ids):
        assert entry.logprob == pytest.approx(lp) and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(lp)          # greedy: the top one
        assert entry.token == model.tokenizer.decode([token], skip_special_tokens=False)
        assert bytes(entry.bytes) == entry.token.encode("utf-8")
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_stream_equal_non_stream(client):
    kw = dict(model=NAME, prompt="log me", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    assert len(whole.tokens) == len(whole.token_logprobs) == len(whole.top_logprobs) == 5
    assert all(len(t) in (2, 3) for t in whole.top_logprobs)          # top 2, plus the sampled one
    assert whole.text_offset == [sum(len(t) for t in whole.tokens[:i]) for i in range(5)]
    parts = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices[0].logprobs]
    assert [p.tokens[0] for p in parts] == whole.tokens
    assert [p.token_logprobs[0] for p in parts] == pytest.approx(whole.token_logprobs)
    assert [p.text_offset[0] for p in parts] == whole.text_offset


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(client, model):
    """lm-eval's loglikelihood request: echo, logprobs 1, max_tokens 1, temperature 0."""
    prompt = "The quick brown fox jumps"
    r = client.completions.create(model=NAME, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
    choice = r.choices[0]
    ids = model.encode(prompt)
    want = model.generate(ids, max_new_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)
    lp = choice.logprobs
    assert choice.text == prompt + want.text
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:-1] == pytest.approx([v for v, _ in want.prompt_logprobs])
    assert lp.token_logprobs[-1] == pytest.approx(want.logprobs[0][0])
    assert "".join(lp.tokens) == model.tokenizer.decode(ids + want.token_ids, skip_special_tokens=False)
    plain = client.completions.create(model=NAME, prompt=prompt, echo=True, max_tokens=2, temperature=0)
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None


def test_prefix_cache_serves_a_repeated_prompt_from_cached_blocks(client, url, model):
    prompt = list(range(300, 380))                           # 80 tokens: 4 full blocks shareable
    before = metrics(url)["ernie_hal_prefix_cache_hits_total"]
    got = [client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
           .choices[0].model_extra["token_ids"] for _ in range(2)]
    assert metrics(url)["ernie_hal_prefix_cache_hits_total"] - before >= 64
    assert got[0] == got[1] == model.generate(prompt, max_new_tokens=5, temperature=0, ignore_eos=True).token_ids


def test_tokenize_and_detokenize(url, model):
    r = post(url, "/tokenize", {"prompt": "hello there"})
    assert r.status_code == 200 and r.json()["tokens"] == model.encode("hello there")
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 2048
    messages = [{"role": "user", "content": "hi"}]
    chat = post(url, "/tokenize", {"messages": messages}).json()["tokens"]
    assert chat == model.encode(messages, chat=True)
    back = post(url, "/detokenize", {"tokens": chat})
    assert back.status_code == 200 and back.json()["prompt"] == model.tokenizer.decode(chat, skip_special_tokens=False)
    both = post(url, "/tokenize", {"prompt": "x", "messages": messages})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    bad = post(url, "/detokenize", {"tokens": [99999]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]


def test_streaming_equals_non_streaming_and_reports_usage(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "stream me"}], max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_stream_ends_with_done(url):
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "prompt": "abc", "max_tokens": 5, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


def test_n_choices_and_seed_reproducibility(client):
    kw = dict(model=NAME, prompt="seeded", max_tokens=16, temperature=1.0, top_p=0.95, n=3, seed=1234,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    ids = lambda r: [c.model_extra["token_ids"] for c in sorted(r.choices, key=lambda c: c.index)]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert ids(a) == ids(b)                                   # same seed, same tokens
    assert len({tuple(x) for x in ids(a)}) > 1                # the choices differ from each other
    assert a.usage.completion_tokens == 48
    c = client.completions.create(**{**kw, "seed": 99})
    assert ids(c) != ids(a)
    g = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], n=2, max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert g.choices[0].message.content == g.choices[1].message.content


def test_stop_strings_are_trimmed(client, url):
    base = dict(model=NAME, prompt="a stop test", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(**base).choices[0].text
    printable = [i for i in range(2, len(free) - 1) if free[i:i + 2].isprintable() and free[i:i + 2].strip()]
    assert printable, f"no usable stop string in {free!r}"
    stop = free[printable[0]:printable[0] + 2]
    want = free[:free.find(stop)]
    r = client.completions.create(stop=[stop, "never-appears"], **base)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **base))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_text_stream_holds_back_partial_stop_strings():
    class Chars:                      # a tokenizer whose ids are characters
        def stream_decoder(self):
            class D:
                def push(self, t): return chr(t)
                def flush(self): return ""
            return D()

    ts = TextStream(Chars(), ["STOP"])
    out = [ts.push(ord(ch)) for ch in "abST"]
    assert "".join(t for t, _ in out) == "ab"                 # "ST" may begin "STOP": held
    assert ts.push(ord("X")) == ("STX", False)                # it did not
    assert [ts.push(ord(ch)) for ch in "STOP"][-1] == ("", True)
    ts = TextStream(Chars(), ["zz"])
    ts.push(ord("q")), ts.push(ord("z"))
    assert ts.flush() == "z"


# ---- 64 concurrent streams ----------------------------------------------------------------------
def test_64_concurrent_streams_equal_one_at_a_time(url, model):
    prompts = [f"request {i}: " + "xyz"[i % 3] * (i % 11) for i in range(64)]
    lengths = [8 + i % 9 for i in range(64)]

    async def one(aclient, p, n):
        stream = await aclient.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True, "return_token_ids": True})
        ids, text, finish = [], [], None
        async for chunk in stream:
            for c in chunk.choices:
                ids += c.model_extra["token_ids"]
                text.append(c.text)
                finish = c.finish_reason or finish
        return ids, "".join(text), finish

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, p, n) for p, n in zip(prompts, lengths)))

    steps = metrics(url)["ernie_hal_engine_steps_total"]
    got = asyncio.run(all_of_them())
    steps = metrics(url)["ernie_hal_engine_steps_total"] - steps
    assert steps < sum(lengths) / 4, f"{steps} forwards for {sum(lengths)} tokens: the requests were not batched"
    for p, n, (ids, text, finish) in zip(prompts, lengths, got):
        want = model.generate(p, max_new_tokens=n, temperature=0, ignore_eos=True)
        assert (ids, text, finish) == (want.token_ids, want.text, "length")
    wait_idle(url)


# ---- bad inputs ---------------------------------------------------------------------------------
BAD = [
    # (what, path, body or raw bytes, status, param, words in the message)
    ("malformed JSON", "/v1/completions", b'{"prompt": "x",', 400, None, "malformed JSON"),
    ("not an object", "/v1/completions", b'[1, 2]', 400, None, "JSON object"),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "7"}, 400, "max_tokens", "valid integer"),
    ("wrong type (bool)", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     400, "stream", "valid boolean"),
    ("missing field", "/v1/chat/completions", {"model": NAME}, 400, "messages", "Field required"),
    ("bad prompt", "/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", "prompt must be"),
    ("prompt too long", "/v1/completions", {"prompt": [300] * 2100, "max_tokens": 1}, 400, "prompt",
     "maximum context length is 2048"),
    ("chat too long", "/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 2100}]}, 400,
     "messages", "maximum context length"),
    ("max_tokens 0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("max_tokens past context", "/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens",
     "maximum context length"),
    ("temperature", "/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature", "between 0 and 2"),
    ("n", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "n must be"),
    ("top_logprobs range", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "logprobs": True, "top_logprobs": 25}, 400, "top_logprobs",
     "between 0 and 20"),
    ("top_logprobs alone", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "top_logprobs": 2}, 400, "top_logprobs", "logprobs set to true"),
    ("completion logprobs", "/v1/completions", {"prompt": "x", "logprobs": "all"}, 400, "logprobs",
     "integer between 0 and 20"),
    ("echo with stream", "/v1/completions", {"prompt": "x", "echo": True, "stream": True}, 400, "echo",
     "not supported with stream"),
    ("presence_penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty",
     "between -2 and 2"),
    ("repetition_penalty", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "repetition_penalty": 0}, 400, "repetition_penalty", "(0, 2]"),
    ("min_p", "/v1/completions", {"prompt": "x", "min_p": 1.5}, 400, "min_p", "[0, 1]"),
    ("five stops", "/v1/completions", {"prompt": "x", "stop": list("abcde")}, 400, "stop", "at most 4"),
    ("token outside vocab", "/v1/completions", {"prompt": [99999]}, 400, "prompt", "outside the vocabulary"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("what,path,body,status,param,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_message(url, what, path, body, status, param, words):
    r = post(url, path, None, raw=body) if isinstance(body, bytes) else post(url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"] and err["param"] == param


def test_api_key_is_required(url, client):
    for key, words in ((None, "missing API key"), ("wrong", "incorrect API key")):
        r = post(url, "/v1/completions", {"prompt": "x"}, key=key)
        assert r.status_code == 401 and words in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")


def test_server_keeps_serving_after_errors(url, client):
    for _, path, body, *_ in BAD:
        post(url, path, None, raw=body) if isinstance(body, bytes) else post(url, path, body)
    r = client.completions.create(model=NAME, prompt="still here", max_tokens=3)
    assert r.usage.completion_tokens >= 1
    m = metrics(url)
    assert m['ernie_hal_requests_total{status="400"}'] >= 14 and m['ernie_hal_requests_total{status="404"}'] >= 1


# ---- disconnects --------------------------------------------------------------------------------
def test_stream_disconnect_frees_kv_blocks(url):
    before = wait_idle(url)
    aborted = before.get('ernie_hal_sequences_finished_total{finish_reason="abort"}', 0)
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "prompt": [300] * 200, "max_tokens": 1800, "stream": True,
                            "ignore_eos": True}) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            m = metrics(url)
            assert m["ernie_hal_num_requests_running"] == 1
            assert m["ernie_hal_kv_cache_free_blocks"] < m["ernie_hal_kv_cache_blocks"]
        # leaving the block closes the connection mid-stream
    m = wait_idle(url, timeout=5)
    assert m['ernie_hal_sequences_finished_total{finish_reason="abort"}'] == aborted + 1


def test_non_streaming_disconnect_frees_kv_blocks(url):
    before = wait_idle(url)
    aborted = before.get('ernie_hal_sequences_finished_total{finish_reason="abort"}', 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                   json={"model": NAME, "prompt": [300] * 200, "max_tokens": 1800, "ignore_eos": True, "n": 2})
    m = wait_idle(url, timeout=5)
    assert m['ernie_hal_sequences_finished_total{finish_reason="abort"}'] == aborted + 2


# ---- the command line: `ernie-hal serve` and `ernie-hal bench serving` ---------------------------
def test_cli_serve_then_bench_serving(tmp_path):
    import os
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ernie_hal", "serve", "--port", str(port), "--device", "cpu",
                               "--max-num-seqs", "8", "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None and time.time() < deadline, "ernie-hal serve did not start"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        out = tmp_path / "bench.json"
        r = subprocess.run([sys.executable, "-m", "ernie_hal", "bench", "serving", "--base-url", base,
                            "--dataset", "random", "--random-input-len", "40", "--random-output-len", "12",
                            "--random-range-ratio", "1.0", "--num-prompts", "6", "--max-concurrency", "3",
                            "--request-rate", "inf", "--output", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Serving Benchmark Result" in r.stdout and "Median TTFT (ms)" in r.stdout
        report = json.loads(out.read_text())
        assert report["completed"] == 6 and report["total_input_tokens"] == 240
        assert report["total_output_tokens"] == 72 and report["max_concurrency"] == 3
        for key in ("request_throughput", "input_throughput", "output_throughput", "mean_ttft_ms",
                    "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
                    "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2e_latency_ms",
                    "median_e2e_latency_ms", "p99_e2e_latency_ms"):
            assert report[key] > 0, key
        before = metrics(base)["ernie_hal_prefix_cache_hits_total"]
        shared = subprocess.run([sys.executable, "-m", "ernie_hal", "bench", "serving", "--base-url", base,
                                 "--random-prefix-len", "48", "--random-input-len", "8", "--random-output-len", "4",
                                 "--random-range-ratio", "1.0", "--num-prompts", "4", "--max-concurrency", "1",
                                 "--output", str(out)], capture_output=True, text=True, timeout=120)
        assert shared.returncode == 0, shared.stderr
        report = json.loads(out.read_text())
        assert report["total_input_tokens"] == 4 * 56 and report["random_prefix_len"] == 48
        # one at a time: requests 2..4 find the 3 full blocks of the shared prefix cached
        assert metrics(base)["ernie_hal_prefix_cache_hits_total"] - before >= 3 * 48
        refused = subprocess.run([sys.executable, "-m", "ernie_hal", "bench", "serving", "--base-url",
                                  "http://192.0.2.1:8000", "--num-prompts", "1"], capture_output=True, text=True)
        assert refused.returncode == 2 and "loopback" in refused.stderr
    finally:
        server.terminate()
        server.wait(30)
