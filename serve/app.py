"""The OpenAI-compatible HTTP server (FastAPI): /v1/chat/completions, /v1/completions,
/v1/models, /health, /metrics. Handlers only parse, tokenize and format; model work runs on
the engine thread (serve/async_engine.py)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.runtime.engine import Engine, GenerationError
from ..core.runtime.sampling import SamplingError, SamplingParams
from ..core.runtime.scheduler import Scheduler, size_kv_cache
from .async_engine import AsyncEngine, Job
from .errors import INTERNAL, CatchAllMiddleware
from .generation_defaults import generation_defaults
from .limits import BodyLimitMiddleware, Limits, check_queue, check_request_seqs
from .metrics import ServerMetrics
from .security import Access, AccessMiddleware
from .shutdown import Draining
from .workers import off_loop, tokens_json
from . import logprobs as lpfmt
from .structured import chat_plan, prepare, requested_grammar
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       chat_messages, check_common, completion_prompts, logprobs_count, parse, stop_strings)

log = logging.getLogger("ernie_hal.serve")
COMPLETION_DEFAULT_MAX_TOKENS = 16      # OpenAI's legacy completions default; chat: the rest of the context
SHUTDOWN = "the server is shutting down; the request was ended before it finished (retry it)"


class Server:
    """Everything a handler needs: the model, the async engine, metrics, the served name."""

    def __init__(self, model, served_model_name: str, engine: AsyncEngine, metrics: ServerMetrics,
                 access: Access, limits: Limits, defaults: dict | None = None):
        self.model, self.name, self.engine, self.metrics = model, served_model_name, engine, metrics
        self.access, self.limits, self.tokenizer = access, limits, model.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.defaults = defaults if defaults is not None else generation_defaults(model.path)
        self.created = int(time.time())
        self.draining = Draining()

    # ---- request checks (the key, Host and Origin are checked by serve/security.py) -----------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.name}`",
                           param="model", code="model_not_found")

    def sampling(self, req, max_tokens, prompt_len: int, default_max_tokens: int | None,
                 prompt_param: str, echo: bool = False) -> SamplingParams:
        limit = self.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt is "
                                f"{prompt_len} tokens; shorten the prompt", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens or limit, limit - prompt_len)
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                                f"completion). Reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        d = self.defaults
        top_k = req.top_k if req.top_k is not None else d["top_k"]
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=float(req.temperature if req.temperature is not None else d["temperature"]),
            top_p=float(req.top_p if req.top_p is not None else d["top_p"]),
            top_k=max(0, top_k), min_p=float(req.min_p or 0.0), seed=None if req.seed is None else req.seed % 2**63,
            ignore_eos=req.ignore_eos, logprobs=logprobs_count(req),
            prompt_logprobs=logprobs_count(req) if echo else None,
            **{name: float(getattr(req, name) if getattr(req, name) is not None else d[name])
               for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")})

    async def read(self, request: Request, cls):
        """The request body as `cls`, after the model check (APIError otherwise)."""
        req = await off_loop(parse, cls, await request.body())
        self.check_model(req.model)
        return req

    def chat_ids(self, req, add_generation_prompt: bool = True) -> list:
        """Token ids of a request's messages through the chat template."""
        if self.tokenizer is None:
            raise APIError(400, f"{self.model.path} has no tokenizer, so no chat template; "
                                f"use /v1/completions with token ids", param="messages")
        messages = chat_messages(req)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_ids(self, req) -> list:
        return [self.encode(p, "prompt") for p in completion_prompts(req)]

    def require_tokenizer(self, param: str):
        if self.tokenizer is None:
            raise APIError(400, f"{self.model.path} has no tokenizer files", param=param)
        return self.tokenizer

    def encode(self, prompt, param: str) -> list:
        if isinstance(prompt, list):
            return list(prompt)
        if self.tokenizer is None:
            raise APIError(400, f"{self.model.path} has no tokenizer; send the prompt as token ids", param=param)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def submit(self, jobs: list, param: str):
        if self.draining.active:
            raise APIError(503, "the server is shutting down; retry on another replica", type="server_error",
                           code="shutting_down")
        check_request_seqs(self.limits, len(jobs), jobs[0].n if jobs else 1, param)
        check_queue(self.limits, max(0, self.engine.outstanding - len(self.engine.scheduler.running)),
                    sum(j.n for j in jobs))
        try:
            return self.engine.submit(jobs)
        except (GenerationError, SamplingError) as e:
            raise APIError(400, str(e), param=param) from None


def build_server(model, served_model_name: str | None = None, *, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | None = None,
                 kv_cache_fraction: float = 0.5, block_size: int = 16, api_key: str | None = None,
                 prefix_caching: bool = True, limits: Limits | None = None, access: Access | None = None) -> Server:
    """Engine + KV cache + scheduler + engine thread (not started) around a loaded Model.
    `access` (Host/Origin/key rules) defaults to a loopback server guarded by `api_key`."""
    limits = limits or Limits()
    access = access or Access(api_key=api_key)
    defaults = generation_defaults(model.path)      # a bad generation_config.json fails before the KV cache
    stops = model.tokenizer.stop_token_ids if model.tokenizer else ()
    engine = Engine(model.model, stop_token_ids=stops, max_model_len=max_model_len, block_size=block_size,
                    graphs=not model.eager, graph_max_batch=max_num_seqs,
                    prefix_caching=prefix_caching)
    size_kv_cache(engine, max_num_seqs, num_blocks=num_kv_blocks, memory=kv_cache_memory,
                  fraction=kv_cache_fraction)
    if engine.graphs is not None:   # capture before serving, so no request waits for a capture
        t0 = time.perf_counter()
        n = engine.graphs.capture_all()
        log.info("decode graphs: %d captured in %.1f s; %s", n, time.perf_counter() - t0, engine.decode_graphs)
    metrics = ServerMetrics()
    scheduler = Scheduler(engine, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          observer=metrics)
    name = served_model_name or os.path.basename(os.path.normpath(str(model.path)))
    return Server(model, name, AsyncEngine(engine, scheduler, model.tokenizer), metrics, access, limits,
                  defaults)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        # the model, torch and the tokenizer are long-lived: keep them out of the collector's full
        # passes, which otherwise stall every thread for hundreds of ms (vLLM freezes them too)
        gc.collect()
        gc.freeze()
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="ernie-hal", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    metrics = server.metrics
    # outermost first: unexpected errors -> 500; Host / Origin / key -> 403 / 401; body -> 413 / 408
    app.add_middleware(BodyLimitMiddleware, limits=server.limits, on_refused=metrics.http_request)
    app.add_middleware(AccessMiddleware, access=server.access, on_refused=metrics.http_request)
    app.add_middleware(CatchAllMiddleware, on_error=metrics.http_request)

    def error(e: APIError) -> JSONResponse:
        metrics.http_request(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=getattr(e, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        stats = {**server.engine.scheduler.stats(), "quantization": server.model.quantization}
        return PlainTextResponse(metrics.render(stats),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        metrics.http_request(200)
        card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "ernie-hal",
                "max_model_len": server.max_model_len, "vocab_size": server.model.config.vocab_size}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's: {"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"}."""
        try:
            req = await server.read(request, TokenizeRequest)
            if (req.prompt is None) == (req.messages is None):
                raise APIError(400, "give exactly one of prompt and messages", param="prompt")
            if req.messages is not None:
                ids = await off_loop(server.chat_ids, req, req.add_generation_prompt)
            else:
                tok = server.require_tokenizer("prompt")
                ids = await off_loop(tok.encode, req.prompt, add_special_tokens=req.add_special_tokens)
        except APIError as e:
            return error(e)
        metrics.http_request(200)
        return Response(await off_loop(tokens_json, ids, server.max_model_len), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """vLLM's: {"tokens"} -> {"prompt"} (special tokens kept)."""
        try:
            req = await server.read(request, DetokenizeRequest)
            tok = server.require_tokenizer("tokens")
            vocab = server.model.config.vocab_size
            bad = [t for t in req.tokens if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
            text = await off_loop(tok.decode, req.tokens, skip_special_tokens=False)
        except APIError as e:
            return error(e)
        metrics.http_request(200)
        return {"prompt": text}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            req = await server.read(request, ChatCompletionRequest)
            check_common(req)
            plan = await chat_plan(server, req)     # tools, response_format, guided_* (serve/structured.py)
            ids = plan.ids
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            params = server.sampling(req, max_tokens, len(ids), None, "messages")
            handle = server.submit([Job(ids, params, req.n, tuple(stop_strings(req.stop)), plan.grammar)],
                                   "messages")
        except APIError as e:
            return error(e)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        if req.stream:
            metrics.http_request(200)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(plan.stream(_chat_stream(handle, meta, req.n, len(ids), usage, req.return_token_ids,
                                                 server.tokenizer)), handle)
        return await _answer(request, handle, lambda outs: plan.body(_chat_body(
            meta, outs, len(ids), req.return_token_ids, server.tokenizer)), metrics)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            req = await server.read(request, CompletionRequest)
            check_common(req)
            check_request_seqs(server.limits, len(completion_prompts(req)), req.n, "prompt")
            prompts = await off_loop(server.completion_ids, req)
            stop = tuple(stop_strings(req.stop))
            grammar = await prepare(server.model, *requested_grammar(req))   # serve/structured.py
            jobs = [Job(ids, server.sampling(req, req.max_tokens, len(ids), COMPLETION_DEFAULT_MAX_TOKENS, "prompt",
                                             echo=req.echo), req.n, stop, grammar) for ids in prompts]
            # echo: the prompt as given (text, or the decoding of its ids) before each completion
            echoed = [p if isinstance(p, str) else server.tokenizer.decode(p) if server.tokenizer else ""
                      for p in completion_prompts(req)] if req.echo else None
            handle = server.submit(jobs, "prompt")
        except APIError as e:
            return error(e)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        prompt_tokens = sum(len(ids) for ids in prompts)
        if req.stream:
            metrics.http_request(200)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_completion_stream(handle, meta, prompt_tokens, usage, req.return_token_ids,
                                           server.tokenizer), handle)
        echo = None if echoed is None else [(echoed[i // req.n], prompts[i // req.n])
                                            for i in range(len(prompts) * req.n)]
        return await _answer(request, handle, lambda outs: _completion_body(
            meta, outs, prompt_tokens, req.return_token_ids, server.tokenizer, echo), metrics)

    return app


# ---- answers ------------------------------------------------------------------------------------
class _Choice:
    def __init__(self):
        self.parts, self.token_ids, self.finish_reason = [], [], None
        self.logprobs = None          # [(log p, alternatives)] when the request asked for them
        self.prompt_logprobs = None   # the prompt's, with echo


async def _collect(handle) -> list:
    choices = [_Choice() for _ in range(handle.remaining)]
    async for index, out in handle.events():
        if out.error is not None:
            log.error("generation failed: %s", out.error)
            raise APIError(500, INTERNAL, type="server_error")
        if out.finish_reason == "abort":
            raise APIError(503, SHUTDOWN, type="server_error", code="shutting_down")
        c = choices[index]
        c.parts.append(out.text)
        if out.token_id is not None:
            c.token_ids.append(out.token_id)
            if out.logprob is not None:
                c.logprobs = (c.logprobs or []) + [out.logprob]
            if out.prompt_logprobs is not None:
                c.prompt_logprobs = out.prompt_logprobs
        c.finish_reason = out.finish_reason or c.finish_reason
    return choices


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(request: Request, handle, make_body, metrics) -> JSONResponse:
    """Collect a non-streaming answer; a client that leaves first gets its work aborted."""
    collector = asyncio.ensure_future(_collect(handle))
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():    # nobody reads this answer; 499 as nginx logs it
            metrics.http_request(499)
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        try:
            choices = collector.result()
        except APIError as e:
            metrics.http_request(e.status)
            return JSONResponse(e.body(), status_code=e.status)
        metrics.http_request(200)
        return await off_loop(lambda: JSONResponse(make_body(choices)))
    finally:
        handle.abort()
        for task in (collector, watcher):
            task.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _ids(c: _Choice, on: bool) -> dict:
    return {"token_ids": c.token_ids} if on else {}


def _chat_body(meta, choices, prompt_tokens, token_ids: bool, tokenizer) -> dict:
    return {**meta, "object": "chat.completion",
            "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(c.parts)},
                         "logprobs": None if c.logprobs is None else lpfmt.chat(tokenizer, c.token_ids, c.logprobs),
                         "finish_reason": c.finish_reason, **_ids(c, token_ids)}
                        for i, c in enumerate(choices)],
            "usage": _usage(prompt_tokens, sum(len(c.token_ids) for c in choices))}


def _completion_body(meta, choices, prompt_tokens, token_ids: bool, tokenizer, echo=None) -> dict:
    """`echo`: (prompt text, prompt ids) per choice, put before its text and logprobs."""
    def logprobs(i, c):
        if c.logprobs is None:
            return None
        if echo is None:
            return lpfmt.completion(tokenizer, c.token_ids, c.logprobs)
        return lpfmt.completion(tokenizer, c.token_ids, c.logprobs, prompt_ids=echo[i][1],
                                prompt_logprobs=c.prompt_logprobs)

    return {**meta, "object": "text_completion",
            "choices": [{"index": i, "text": ("" if echo is None else echo[i][0]) + "".join(c.parts),
                         "logprobs": logprobs(i, c), "finish_reason": c.finish_reason, **_ids(c, token_ids)}
                        for i, c in enumerate(choices)],
            "usage": _usage(prompt_tokens, sum(len(c.token_ids) for c in choices))}


# ---- server-sent events -------------------------------------------------------------------------
def _sse(gen, handle) -> StreamingResponse:
    # the background abort also runs when the client disconnected and the stream was cancelled
    return StreamingResponse(gen, media_type="text/event-stream", background=BackgroundTask(handle.abort),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _stream(handle, chunk, final_usage):
    """Shared body of both streams: one chunk per token (or finish) of a choice, an error
    chunk if generation fails, the usage chunk when asked, then [DONE]. Leaving early (the
    client disconnected: the task is cancelled) aborts the work at once."""
    tokens = 0
    try:
        async for index, out in handle.events():
            if out.error is not None:
                log.error("generation failed: %s", out.error)
                yield _event(APIError(500, INTERNAL, type="server_error").body())
                break
            if out.finish_reason == "abort":
                yield _event(APIError(503, SHUTDOWN, type="server_error", code="shutting_down").body())
                break
            tokens += out.token_id is not None
            yield _event(chunk(index, out))
        else:
            if final_usage is not None:
                yield _event(final_usage(tokens))
        yield "data: [DONE]\n\n"
    finally:
        handle.abort()


def _chunk_ids(out, on: bool) -> dict:
    return {"token_ids": [out.token_id] if out.token_id is not None else []} if on else {}


async def _chat_stream(handle, meta, n, prompt_tokens, include_usage, token_ids, tokenizer):
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    for i in range(n):      # OpenAI opens every choice with the assistant role
        yield _event({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}], **extra})

    def chunk(index, out):
        delta = {"content": out.text} if out.token_id is not None else {}
        lp = None if out.logprob is None else lpfmt.chat(tokenizer, [out.token_id], [out.logprob])
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": lp,
                                     "finish_reason": out.finish_reason, **_chunk_ids(out, token_ids)}], **extra}

    usage = (lambda t: {**base, "choices": [], "usage": _usage(prompt_tokens, t)}) if include_usage else None
    async for line in _stream(handle, chunk, usage):
        yield line


async def _completion_stream(handle, meta, prompt_tokens, include_usage, token_ids, tokenizer):
    base = {**meta, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    offsets: dict = {}     # choice -> text offset of its next token

    def chunk(index, out):
        lp = None
        if out.logprob is not None:
            lp = lpfmt.completion(tokenizer, [out.token_id], [out.logprob], offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(lp["tokens"][0])
        return {**base, "choices": [{"index": index, "text": out.text, "logprobs": lp,
                                     "finish_reason": out.finish_reason, **_chunk_ids(out, token_ids)}], **extra}

    usage = (lambda t: {**base, "choices": [], "usage": _usage(prompt_tokens, t)}) if include_usage else None
    async for line in _stream(handle, chunk, usage):
        yield line
