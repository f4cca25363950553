"""Sampling defaults: the checkpoint's generation_config.json where it sets them (as vLLM does),
else OpenAI's (temperature 1, top_p 1, no penalties). Read once at startup and checked there,
so a bad value (NaN, a string, temperature 7) stops the server with one line naming the file and
field instead of failing every request that leaves the field out."""

from __future__ import annotations

import json
import math
import os

FILE = "generation_config.json"
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "repetition_penalty": 1.0}
# the ranges the request fields are checked against (serve/protocol.py check_common)
RANGES = {"temperature": (0, 2, "between 0 and 2"), "top_p": (0, 1, "in (0, 1]"), "top_k": (0, None, ">= 0"),
          "presence_penalty": (-2, 2, "between -2 and 2"), "frequency_penalty": (-2, 2, "between -2 and 2"),
          "repetition_penalty": (0, 2, "in (0, 2]")}


class GenerationConfigError(ValueError):
    """generation_config.json cannot be read or holds a value the server cannot use."""


def generation_defaults(path) -> dict:
    out = dict(OPENAI_DEFAULTS)
    file = os.path.join(str(path), FILE)
    if not os.path.exists(file):
        return out
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise GenerationConfigError(f"{file}: not readable JSON ({e}); fix or remove the file") from None
    if not isinstance(cfg, dict):
        raise GenerationConfigError(f"{file}: expected a JSON object, found {type(cfg).__name__}")
    for key in out:
        value = cfg.get(key)
        if value is None:
            continue
        lo, hi, words = RANGES[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = number and (int(value) == value if key == "top_k" else True) and \
            (value >= lo if key in ("temperature", "top_k") or lo < 0 else value > lo) and (hi is None or value <= hi)
        if not ok:
            raise GenerationConfigError(f"{file}: field {key!r} must be a finite number {words}, found {value!r}; "
                                        f"fix the file or remove the field")
        out[key] = int(value) if key == "top_k" else float(value)
    return out
