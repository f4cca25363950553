"""OpenAI tool calling on ERNIE-4.5: `tools` + `tool_choice` in, `tool_calls` out.

- "none": tools are ignored, the answer is text.
- "auto": the tools go to the chat template (when it renders them) and the answer is parsed for
  ERNIE's format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (what ERNIE-4.5's
  thinking models emit and FastDeploy's and vLLM's ERNIE parsers read); text otherwise.
- "required": one call, generated under a grammar: {"name": <one of the tools>, "arguments":
  <that tool's parameter schema>}.
- a named function: its arguments, generated under its parameter schema.

Earlier turns with tool calls (assistant `tool_calls`, `role: "tool"` results) go to a template
that knows tools as they are; a template that does not (ERNIE-4.5's base template) gets them
written in the same tag format as user/assistant text, so no turn is dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from ..core.runtime.grammar import GrammarError, GrammarSpec
from .protocol import APIError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    mode: str                                  # "none" | "auto" | "required" | "named"
    tools: list = field(default_factory=list)  # the request's tools, as sent (OpenAI's shape)
    name: str | None = None                    # the named function
    grammar: GrammarSpec | None = None         # required / named

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def tool_plan(req) -> ToolPlan | None:
    """The request's tool handling, validated (APIError 400); None without tools."""
    tools, choice = getattr(req, "tools", None), getattr(req, "tool_choice", None)
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools: give the functions in 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {'type': 'function', 'function': {...}}", param="tools")
    schemas = {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not NAME.match(f["name"]):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                f"'parameters': {{...}}}}}} with a name of letters, digits, _ . - (at most 64)",
                           param=f"tools.{i}")
        if f["name"] in schemas:
            raise APIError(400, f"tools[{i}]: the function name {f['name']!r} is given twice", param=f"tools.{i}")
        params = f.get("parameters")
        try:
            schemas[f["name"]] = GrammarSpec.json_schema(EMPTY_PARAMETERS if params is None else params)
        except GrammarError as e:
            raise APIError(400, f"tools[{i}].function.parameters: {e}", param=f"tools.{i}.function.parameters") \
                from None
    choice = "auto" if choice is None else choice
    if choice in ("none", "auto"):
        return ToolPlan(choice, tools)
    if choice == "required":
        cases = [{"type": "object", "properties": {"name": {"const": n}, "arguments": json.loads(s.source)},
                  "required": ["name", "arguments"]} for n, s in schemas.items()]
        schema = cases[0] if len(cases) == 1 else {"anyOf": cases}
        return ToolPlan("required", tools, grammar=GrammarSpec("json_schema", json.dumps(schema)))
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(named, str)):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                            "'function': {'name': ...}}", param="tool_choice")
    if named not in schemas:
        raise APIError(400, f"tool_choice names {named!r}, which is not among the tools "
                            f"({', '.join(schemas)})", param="tool_choice")
    return ToolPlan("named", tools, name=named, grammar=schemas[named])


# ---- the prompt ---------------------------------------------------------------------------------
def template_renders_tools(tokenizer) -> bool:
    return re.search(r"\btools\b", tokenizer.chat_template or "") is not None


def template_messages(req, messages: list, native: bool) -> list:
    """`messages` (role + text, from protocol.chat_messages) with the request's tool turns:
    kept as fields for a template that renders tools (`native`), else written as tags."""
    out = []
    for m, raw in zip(messages, req.messages):
        calls = getattr(raw, "tool_calls", None) or []
        if native:
            m = dict(m)
            if calls:
                m["tool_calls"] = [_template_call(c) for c in calls]
            for key in ("tool_call_id", "name"):
                if getattr(raw, key, None) is not None:
                    m[key] = getattr(raw, key)
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        elif calls:
            tags = "".join(f"{CALL_OPEN}\n{json.dumps(_call_json(c), ensure_ascii=False)}\n{CALL_CLOSE}"
                           for c in calls)
            m = {**m, "content": (m["content"] + "\n" if m["content"] else "") + tags}
        out.append(m)
    return out


def _call_json(call) -> dict:
    f = call.get("function", {}) if isinstance(call, dict) else {}
    args = f.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"name": f.get("name"), "arguments": args}


def _template_call(call) -> dict:
    """HF templates read `tool_call.function.name` and `.arguments` (a dict) or the same at top level."""
    c = _call_json(call)
    return {"id": call.get("id") if isinstance(call, dict) else None, "type": "function", "function": c, **c}


# ---- the answer ---------------------------------------------------------------------------------
def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str) -> tuple:
    """(content before the calls, or None; [{"name", "arguments" (JSON text)}]) from ERNIE's
    format. A call whose JSON does not parse stays in the content."""
    calls, content, pos = [], [], 0
    while True:
        start = text.find(CALL_OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        end = text.find(CALL_CLOSE, start)
        body = text[start + len(CALL_OPEN):end if end >= 0 else len(text)]
        call = _parse_call(body)
        if call is None:
            content.append(text[start:end + len(CALL_CLOSE)] if end >= 0 else text[start:])
        else:
            calls.append(call)
        if end < 0:
            break
        pos = end + len(CALL_CLOSE)
    text = "".join(content).strip()
    return (text or None), calls


def _parse_call(body: str):
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def _tool_call(call: dict, index: int = 0, call_id: str | None = None) -> dict:
    return {"index": index, "id": call_id or new_call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def _forced_calls(plan: ToolPlan, text: str) -> list | None:
    if plan.mode == "named":
        return [{"name": plan.name, "arguments": text}]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None               # cut by max_tokens: the text is returned as it is
    return [{"name": obj["name"], "arguments": json.dumps(obj["arguments"], ensure_ascii=False)}]


def rewrite_body(body: dict, plan: ToolPlan) -> dict:
    """A chat.completion body with each choice's text turned into tool_calls where it holds them."""
    for choice in body["choices"]:
        text = choice["message"].get("content") or ""
        if plan.forced:
            calls, content = _forced_calls(plan, text), None
            if calls is None:
                continue
        elif plan.mode == "auto":
            content, calls = parse_tool_calls(text)
            if not calls:
                continue
        else:
            continue
        choice["message"] = {"role": "assistant", "content": content,
                             "tool_calls": [{k: v for k, v in _tool_call(c, i).items() if k != "index"}
                                            for i, c in enumerate(calls)]}
        if choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"
    return body


class _StreamState:
    """One choice of a streamed answer: what it has held back and the call id it streams."""

    def __init__(self):
        self.held, self.calling, self.call_id = "", False, new_call_id()


async def rewrite_stream(lines, plan: ToolPlan):
    """The SSE lines of a chat stream with tool calls as OpenAI streams them: a named call opens
    with its id and name and streams its arguments; a required call, and the calls of "auto"
    (after `<tool_call>` appears; text before it streams as content), come whole in the chunk
    that finishes the choice."""
    states: dict = {}
    async for line in lines:
        if not line.startswith("data: {"):
            yield line
            continue
        chunk = json.loads(line[len("data: "):])
        for choice in chunk.get("choices", []):
            _rewrite_choice(choice, states.setdefault(choice["index"], _StreamState()), plan)
        yield f"data: {json.dumps(chunk, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _rewrite_choice(choice: dict, st: _StreamState, plan: ToolPlan) -> None:
    delta = choice.get("delta", {})
    finish = choice.get("finish_reason")
    if "role" in delta:                           # the opening chunk
        if plan.mode == "named":
            delta.update(content=None, tool_calls=[_tool_call({"name": plan.name, "arguments": ""}, 0, st.call_id)])
        elif plan.mode == "required":
            delta["content"] = None
        return
    text = delta.pop("content", "") or ""
    if plan.mode == "named":
        if text:
            delta["tool_calls"] = [{"index": 0, "function": {"arguments": text}}]
        if finish == "stop":
            choice["finish_reason"] = "tool_calls"
        return
    if plan.mode == "required":
        st.held += text
        if finish is not None:
            calls = _forced_calls(plan, st.held)
            if calls is None:
                delta["content"] = st.held
            else:
                delta["tool_calls"] = [_tool_call(c, i) for i, c in enumerate(calls)]
                choice["finish_reason"] = "tool_calls" if finish == "stop" else finish
        return
    # auto: text streams until a call may begin; from `<tool_call>` on it is held for parsing
    st.held += text
    if not st.calling:
        at = st.held.find(CALL_OPEN)
        if at >= 0:
            out, st.held, st.calling = st.held[:at], st.held[at:], True
        else:
            keep = _partial_open(st.held) if finish is None else 0
            out, st.held = st.held[:len(st.held) - keep], st.held[len(st.held) - keep:]
        if out:
            delta["content"] = out
    if finish is not None and st.calling:
        content, calls = parse_tool_calls(st.held)
        if calls:
            delta["tool_calls"] = [_tool_call(c, i) for i, c in enumerate(calls)]
            if content:
                delta["content"] = delta.get("content", "") + content
            if finish == "stop":
                choice["finish_reason"] = "tool_calls"
        else:
            delta["content"] = delta.get("content", "") + st.held


def _partial_open(text: str) -> int:
    """Length of the longest suffix of `text` that could still grow into `<tool_call>`."""
    for k in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:k]):
            return k
    return 0
