"""Structured output requests: OpenAI's `response_format` and vLLM's `guided_*` fields to a
GrammarSpec (core/runtime/grammar.py), compiled off the event loop, each sequence given its own
matcher. Anything that does not compile is a 400 naming the problem."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from ..core.runtime.grammar import GrammarError, GrammarSpec
from .protocol import APIError, chat_messages
from .tools import ToolPlan, rewrite_body, rewrite_stream, template_messages, template_renders_tools, tool_plan
from .workers import off_loop

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def requested_grammar(req) -> tuple:
    """(GrammarSpec or None, the request field it came from) for response_format / guided_*."""
    found = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        spec = _response_format(rf)
        if spec is not None:
            found.append((spec, "response_format"))
    for name in GUIDED:
        value = getattr(req, name, None)
        if value is not None:
            found.append((_guided(name, value), name))
    if len(found) > 1:
        raise APIError(400, f"give at most one of response_format and {', '.join(GUIDED)}; got "
                            f"{' and '.join(p for _, p in found)}", param=found[1][1])
    return found[0] if found else (None, None)


def _response_format(rf):
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise APIError(400, "response_format must be an object with a 'type': text, json_object or json_schema",
                       param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise APIError(400, "response_format.json_schema must be an object with 'name' and 'schema'",
                           param="response_format.json_schema")
        schema = js.get("schema", {})
        try:
            return GrammarSpec.json_schema(schema)
        except GrammarError as e:
            raise APIError(400, f"response_format.json_schema.schema: {e}",
                           param="response_format.json_schema.schema") from None
    raise APIError(400, f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
                   param="response_format.type")


def _guided(name: str, value):
    try:
        if name == "guided_json":
            return GrammarSpec.json_schema(value)
        if name == "guided_choice":
            return GrammarSpec.choice(value)
        if not isinstance(value, str) or not value:
            raise GrammarError("must be a non-empty string")
        return GrammarSpec("regex" if name == "guided_regex" else "ebnf", value)
    except GrammarError as e:
        raise APIError(400, f"{name}: {e}", param=name) from None


async def prepare(model, spec: GrammarSpec | None, param: str):
    """A factory of fresh GrammarStates for `spec` (None: no grammar). Compiles in a worker
    thread (the first call also hands the vocabulary to xgrammar), so other requests keep
    streaming; a grammar that does not compile is a 400."""
    if spec is None:
        return None

    def build():
        grammars = model.grammars
        grammars.compile(spec)
        return grammars

    try:
        grammars = await asyncio.to_thread(build)
    except (GrammarError, ValueError) as e:
        raise APIError(400, f"{param}: {e}", param=param) from None
    return lambda: grammars.state(spec)


@dataclass
class ChatPlan:
    """What a chat request needs beyond plain text: its prompt ids (tools rendered), the grammar
    of its choices, and how to turn their text into tool calls."""
    ids: list
    grammar: Callable | None = None
    tools: ToolPlan | None = None

    def body(self, body: dict) -> dict:
        return rewrite_body(body, self.tools) if self.tools is not None else body

    def stream(self, lines):
        return rewrite_stream(lines, self.tools) if self.tools is not None else lines


async def chat_plan(server, req) -> ChatPlan:
    tools = tool_plan(req)
    spec, param = requested_grammar(req)
    if tools is not None and tools.forced:
        if spec is not None:
            raise APIError(400, f"{param} cannot be combined with tool_choice {tools.mode!r}: the call's "
                                f"arguments follow the function's parameters", param=param)
        spec, param = tools.grammar, "tool_choice"
    if tools is None and not any(m.role == "tool" or getattr(m, "tool_calls", None) for m in req.messages):
        ids = await off_loop(server.chat_ids, req)
    else:
        ids = await off_loop(_tool_chat_ids, server, req, tools)
    return ChatPlan(ids, await prepare(server.model, spec, param),
                    tools if tools is not None and tools.mode != "none" else None)


def _tool_chat_ids(server, req, tools: ToolPlan | None) -> list:
    tok = server.require_tokenizer("messages")
    native = template_renders_tools(tok)
    messages = template_messages(req, chat_messages(req), native)
    offered = tools.tools if tools is not None and tools.mode != "none" and native else None
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=offered)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    return tok.encode(text, add_special_tokens=False)
