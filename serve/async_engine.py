"""The bridge between asyncio and the engine thread.

`submit` turns prompts into scheduler Requests; the engine thread hands each step's outputs to
`loop.call_soon_threadsafe`, so the event loop never waits on model work and the engine never
waits on a client. A `Handle` yields (choice index, SeqOutput) as they come; `abort()` (called
when the client goes away) stops its requests and frees their KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from functools import partial
from typing import Callable

from ..core.runtime.engine import Engine
from ..core.runtime.sampling import SamplingParams
from ..core.runtime.scheduler import EngineThread, Request, Scheduler, SeqOutput
from .text import TextStream


@dataclass
class Job:
    prompt_ids: list
    params: SamplingParams
    n: int = 1
    stop: tuple = ()
    grammar: Callable | None = None     # makes each choice's GrammarState (structured output)


class Handle:
    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop, handle_id: str, live: set):
        self.scheduler, self.loop, self.id, self.live = scheduler, loop, handle_id, live
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list = []
        self.remaining = 0                  # choices not finished yet
        self.ended = False                  # end() was called: the reader gets an abort event next

    def _post(self, offset: int, outs: list) -> None:        # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, [(offset + o.index, o) for o in outs])

    async def events(self):
        """(choice index, SeqOutput) until every choice has finished."""
        while self.remaining:
            batch = await self.queue.get()
            if self.ended:      # shutdown: one abort event, whatever else was queued
                self.remaining = 0
                self.live.discard(self)
                yield 0, SeqOutput(0, finish_reason="abort")
                return
            for index, out in batch:
                if out.finish_reason is not None:
                    self.remaining -= 1
                yield index, out
        self.live.discard(self)

    def abort(self) -> None:
        """Stop what is still running (no-op once every choice has finished)."""
        self.live.discard(self)
        if self.remaining:
            for r in self.requests:
                self.scheduler.abort(r.request_id)
            self.remaining = 0

    def end(self) -> None:
        """Shutdown's last word (event loop): stop the work; the reader gets one abort event."""
        for r in self.requests:
            self.scheduler.abort(r.request_id)
        self.ended = True
        self.queue.put_nowait([])


class AsyncEngine:
    def __init__(self, engine: Engine, scheduler: Scheduler, tokenizer=None):
        self.engine, self.scheduler, self.tokenizer = engine, scheduler, tokenizer
        self.thread = EngineThread(scheduler)
        self._ids = itertools.count()
        self.live: set = set()          # handles with choices still running (shutdown drains them)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    @property
    def outstanding(self) -> int:
        """Choices queued or running, over all requests."""
        return sum(h.remaining for h in list(self.live))

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, jobs: list) -> Handle:
        """Queue every job (n choices each; choice indices run across jobs in order). Raises the
        engine's GenerationError / SamplingError before anything is queued."""
        handle = Handle(self.scheduler, asyncio.get_running_loop(), f"r{next(self._ids)}", self.live)
        offset = 0
        for k, job in enumerate(jobs):
            seqs = [self.engine.new_sequence(job.prompt_ids, job.params, seed_offset=i) for i in range(job.n)]
            for s in seqs if job.grammar is not None else ():
                s.grammar = job.grammar()
            detoks = [TextStream(self.tokenizer, job.stop) for _ in range(job.n)]
            handle.requests.append(Request(f"{handle.id}-{k}", seqs, on_output=partial(handle._post, offset),
                                           detokenizers=detoks))
            offset += job.n
        handle.remaining = offset
        self.live.add(handle)
        for r in handle.requests:
            self.scheduler.add(r)
        return handle
