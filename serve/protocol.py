"""The OpenAI request bodies we accept, their validation, and OpenAI's error shape.

Validation errors are 400 (as vLLM answers them; OpenAI's own API does too), never FastAPI's
422: malformed JSON, a body that is not an object, a field of the wrong type, a value out of
range. Fields we do not know are ignored, as vLLM does; fields we know but do not implement
(suffix, logit_bias, echo with stream, ...) are refused with 400 when set to a non-default.
Extensions, as vLLM spells them: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `return_token_ids`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..core.runtime.sampling import MAX_LOGPROBS
from .inputs import MAX_JSON_DEPTH, json_problem

MAX_STOP = 4
MAX_N = 128


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    # strict: "10" is not an int, 1.0 is not an int, "true" is not a bool; ints pass as floats
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: Any = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None   # vLLM's extension (Hugging Face's penalty)
    logit_bias: dict | None = None
    return_token_ids: bool = False        # vLLM's extension: token ids beside the text
    # structured output, OpenAI's and vLLM's spellings (checked in serve/structured.py)
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None


class ChatMessage(_Strict):
    role: str
    content: Any = None
    name: str | None = None
    tool_calls: Any = None                # an assistant turn's calls; `tool_call_id` on a "tool" turn
    tool_call_id: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: Any = None                     # checked in serve/tools.py
    tool_choice: Any = None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class CompletionRequest(_Common):
    prompt: Any
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def parse(cls, raw: bytes):
    """A request model from raw body bytes, or APIError(400) saying what is wrong."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"malformed JSON in the request body: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    problem = json_problem(data)
    if problem is not None:
        raise APIError(400, problem[1], param=problem[0], code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        got = json.dumps(err.get("input"))[:80] if err["type"] != "missing" else None
        detail = f"{err['msg']}" + (f", got {got}" if got is not None else "")
        raise APIError(400, f"invalid '{loc}': {detail}", param=loc) from None


# ---- field checks ------------------------------------------------------------------------------
def check_common(req: _Common) -> None:
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {req.temperature}", param="temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
    if req.top_k is not None and req.top_k < -1:
        raise APIError(400, f"top_k must be -1 or 0 (off) or a positive integer, got {req.top_k}", param="top_k")
    if req.min_p is not None and not 0 <= req.min_p <= 1:
        raise APIError(400, f"min_p must be in [0, 1] (0 = off), got {req.min_p}", param="min_p")
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not -2 <= value <= 2:
            raise APIError(400, f"{name} must be between -2 and 2, got {value}", param=name)
    if req.repetition_penalty is not None and not 0 < req.repetition_penalty <= 2:
        raise APIError(400, f"repetition_penalty must be in (0, 2] (1 = off), got {req.repetition_penalty}",
                       param="repetition_penalty")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    stop_strings(req.stop)


def logprobs_count(req: _Common) -> int | None:
    """How many alternatives per token the request wants log-probabilities for; None = off.
    Chat: `logprobs: true` + `top_logprobs: k`; completions (legacy): `logprobs: k`."""
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise APIError(400, f"logprobs must be a boolean for chat completions, got {req.logprobs!r}",
                           param="logprobs")
        top = req.top_logprobs
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {top}", param="top_logprobs")
        if top and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        return (top or 0) if req.logprobs else None
    k = req.logprobs
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be an integer between 0 and {MAX_LOGPROBS}, got {k!r}", param="logprobs")
    return k


def stop_strings(stop) -> list:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    return [s for s in stop if s]


def chat_messages(req: ChatCompletionRequest) -> list:
    """Messages as the chat template takes them: role + text content."""
    if not req.messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                        f"are supported", param=f"messages.{i}.content")
                parts.append(part["text"])
            content = "\n".join(parts)
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string, a list of text parts, or null",
                           param=f"messages.{i}.content")
        out.append({"role": m.role, "content": content if content is not None else ""})
    return out


def completion_prompts(req: CompletionRequest) -> list:
    """The prompts of a completion request: each a str or a list of token ids."""
    if req.echo and req.stream:
        raise APIError(400, "echo is not supported with stream; ask without stream", param="echo")
    if req.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported by this server (leave it unset or equal to n)", param="best_of")
    p = req.prompt
    ids = lambda x: isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(p, str):
        return [p]
    if ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return list(p)
    if isinstance(p, list) and p and all(ids(x) for x in p):
        return list(p)
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of "
                        "token-id lists (none empty)", param="prompt")
