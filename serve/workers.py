"""CPU work of the HTTP handlers (JSON parsing, tokenization, detokenization, response bodies)
runs on a small thread pool, so the event loop keeps answering other clients and /health while
a large request is being prepared. Tokenizers in Rust release the GIL; pure-Python work still
yields the loop every switch interval (5 ms)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ernie-hal-http")


async def off_loop(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(_pool, partial(fn, *args, **kwargs))


def tokens_json(ids: list, max_model_len: int) -> bytes:
    """/tokenize's body. A list of millions of ids is rendered in slices: one json.dumps of it
    would hold the GIL for a second and stall the event loop even from a worker thread."""
    step = 1 << 13     # ~10 ms of work per slice
    parts = [",".join(map(str, ids[i:i + step])) for i in range(0, len(ids), step)]
    return (f'{{"tokens":[{",".join(parts)}],"count":{len(ids)},"max_model_len":{max_model_len}}}').encode()
