"""Checks of a parsed JSON body that pydantic does not make: nesting depth (deep trees exhaust
the recursion of every later step) and lone UTF-16 surrogates (JSON's "\\ud800" decodes to a
str that cannot be encoded, so the tokenizer or the response would fail)."""

from __future__ import annotations

MAX_JSON_DEPTH = 64


def json_problem(data, max_depth: int = MAX_JSON_DEPTH) -> tuple | None:
    """(param, message) for the first problem in `data`, or None. Iterative: no recursion."""
    stack = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > max_depth:
            return _param(path), f"the request body nests deeper than {max_depth} levels (at '{_param(path)}')"
        if isinstance(value, str):
            if _bad(value):
                return _param(path), f"invalid '{_param(path)}': the string holds a lone UTF-16 surrogate " \
                                     f"(not valid Unicode); send well-formed UTF-16 pairs"
        elif isinstance(value, dict):
            for k, v in value.items():
                if _bad(k):
                    return _param(path), f"a key in '{_param(path) or 'the body'}' holds a lone UTF-16 surrogate"
                stack.append((v, path + (k,), depth + 1))
        elif isinstance(value, list):
            stack.extend((v, path + (i,), depth + 1) for i, v in enumerate(value))
    return None


def _bad(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _param(path: tuple) -> str | None:
    return ".".join(str(p) for p in path) or None
