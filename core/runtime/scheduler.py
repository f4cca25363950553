"""Continuous batching over the block KV cache, device-neutral.

A `Scheduler` owns a FIFO queue of waiting sequences and the running batch. Each `step()`:

1. takes the requests and aborts other threads handed in (a lock-guarded inbox, so `add` and
   `abort` are safe from any thread, and an abort frees its KV blocks before the next forward);
2. plans one forward under a token budget (`max_num_batched_tokens`): every running decode
   first (one token each), then prefill chunks of running sequences in admission order, then
   new sequences from the head of the queue. A long prompt is prefilled a chunk per step, so
   the other streams keep getting a token every step;
3. runs `Engine.step`, hands each request its new tokens, and frees finished sequences.

Admission is bounded by free KV blocks: the head of the queue is admitted only when the free
blocks cover its whole prompt, plus the blocks promised to prompts still being prefilled, plus
a 1 % watermark; otherwise it waits. The order is strict FIFO (the head is never overtaken),
so no request starves. When the running decodes need a new block and none is free, the most
recently admitted sequence is preempted by recompute: its blocks go back, it returns to the
front of the queue, and when re-admitted it prefills its prompt and the tokens it had already
produced, then continues; nothing is lost or sent twice. The scheduler caps the engine's
max_model_len at what the cache holds, so any one admitted sequence can always run alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from .engine import Engine, Sequence
from .kvcache import KVCache
from .threads import release_openmp_pool

log = logging.getLogger("ernie_hal.scheduler")


@dataclass
class SeqOutput:
    """What one step produced for one choice of a request."""
    index: int                        # choice index within the request
    token_id: int | None = None       # None on abort / error events
    text: str = ""                    # newly released text (from the request's detokenizers)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    logprob: tuple | None = None      # (log p(token), [(id, log p)] alternatives) when asked for
    prompt_logprobs: list | None = None   # with a choice's first token, when asked for


class Request:
    """One prompt sampled `len(seqs)` times. `on_output(list[SeqOutput])` is called from the
    engine thread once per step that produced something for it (it must not block). Optional
    `detokenizers[i]` turn tokens into text: `push(token) -> (text, stopped)` (stopped ends the
    choice with finish_reason "stop", e.g. a stop string) and `flush() -> text` at the end."""

    def __init__(self, request_id: str, seqs: list, on_output: Callable | None = None,
                 detokenizers: list | None = None):
        self.request_id, self.seqs, self.on_output = request_id, list(seqs), on_output
        self.detokenizers = detokenizers
        self.arrival = time.monotonic()
        self.prompt_len = len(self.seqs[0].prompt_ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class Observer:
    """Hooks for metrics; every method runs on the engine thread. The default does nothing."""

    def request_added(self, request: Request) -> None: ...
    def first_token(self, seconds: float) -> None: ...          # time to first token of a choice
    def inter_token(self, seconds: float) -> None: ...          # gap between tokens of a choice
    def tokens_generated(self, n: int) -> None: ...
    def preempted(self) -> None: ...
    def request_finished(self, request: Request) -> None: ...


class Scheduler:
    def __init__(self, engine: Engine, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 observer: Observer | None = None):
        if engine.kv is None:
            raise ValueError("size the engine's KV cache (engine.ensure_kv) before building a scheduler")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({max_num_seqs}): every running sequence decodes one token per step")
        self.engine, self.kv = engine, engine.kv
        self.block_size = engine.block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.observer = observer or Observer()
        capacity = self.kv.num_blocks * self.block_size
        if engine.max_model_len > capacity:
            log.warning("max_model_len %d is more than the KV cache holds; capped at %d tokens",
                        engine.max_model_len, capacity)
            engine.max_model_len = capacity
        self.watermark = self.kv.num_blocks // 100
        self.waiting: deque = deque()
        self.running: list = []
        self._owner: dict = {}            # seq_id -> (Request, choice index)
        self._requests: dict = {}         # request_id -> Request
        self._last_token: dict = {}       # seq_id -> time of its last token
        self._cond = threading.Condition()
        self._inbox: list = []
        self._aborts: list = []
        self.num_preemptions = 0
        self.num_steps = 0

    # ---- any thread -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request (its sequences made by engine.new_sequence, hence validated)."""
        with self._cond:
            self._inbox.append(request)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next forward. Unknown ids are ignored."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self.has_work():
                self._cond.wait(timeout)
            return self.has_work()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inbox or self._aborts)

    def stats(self) -> dict:
        """A snapshot for /metrics (read without the engine thread's cooperation)."""
        kv = self.kv
        return {"num_waiting": len(self.waiting) + len(self._inbox), "num_running": len(self.running),
                "kv_blocks_total": kv.num_blocks, "kv_blocks_free": kv.num_free_blocks,
                "kv_usage": kv.usage(), "num_preemptions": self.num_preemptions,
                "num_steps": self.num_steps, **kv.allocator.stats(), **self.engine.graph_metrics()}

    # ---- engine thread ----------------------------------------------------------------------
    def step(self) -> list:
        """One scheduling round and one forward. Returns [(request, [SeqOutput])] as delivered."""
        self._take_inbox()
        plan = self._plan()
        if not plan:
            return []
        seqs, counts = [s for s, _ in plan], [n for _, n in plan]
        try:
            produced = self.engine.step(seqs, num_tokens=counts)
        except Exception as e:      # a failed forward fails its requests, never the server
            log.exception("engine step failed")
            return self._fail({self._owner[s.seq_id][0].request_id for s in seqs}, f"{type(e).__name__}: {e}")
        self.num_steps += 1
        now = time.monotonic()
        outputs: dict = {}
        for s, token in produced:
            request, index = self._owner[s.seq_id]
            text = ""
            if request.detokenizers is not None:
                text, stopped = request.detokenizers[index].push(token)
                if stopped:
                    s.finish_reason = "stop"
            last = self._last_token.get(s.seq_id)
            if last is None:
                self.observer.first_token(now - request.arrival)
            else:
                self.observer.inter_token(now - last)
            self._last_token[s.seq_id] = now
            if s.finished and request.detokenizers is not None:
                text += request.detokenizers[index].flush()
            outputs.setdefault(request.request_id, (request, []))[1].append(
                SeqOutput(index, token, text, s.finish_reason,
                          logprob=s.logprobs[-1] if s.params.logprobs is not None else None,
                          prompt_logprobs=list(s.prompt_logprobs)
                          if s.params.prompt_logprobs is not None and len(s.output_ids) == 1 else None))
            if s.finished:
                self._retire(s)
        self.observer.tokens_generated(len(produced))
        delivered = list(outputs.values())
        for request, outs in delivered:
            self._deliver(request, outs)
            if request.finished:
                self._requests.pop(request.request_id, None)
                self.observer.request_finished(request)
        return delivered

    def _take_inbox(self) -> None:
        with self._cond:
            inbox, aborts = self._inbox, self._aborts
            self._inbox, self._aborts = [], []
        for request in inbox:
            self._requests[request.request_id] = request
            for i, s in enumerate(request.seqs):
                self._owner[s.seq_id] = (request, i)
                self.waiting.append(s)
            self.observer.request_added(request)
        for request_id in aborts:
            request = self._requests.pop(request_id, None)
            if request is None:
                continue
            outs = []
            for i, s in enumerate(request.seqs):
                if not s.finished:
                    s.finish_reason = "abort"
                    outs.append(SeqOutput(i, finish_reason="abort"))
                self._retire(s)
            self._deliver(request, outs)
            self.observer.request_finished(request)

    def fail_all(self, message: str) -> None:
        """Fail every request the scheduler holds (after an unexpected error) and free its blocks."""
        self._take_inbox()
        self._fail(list(self._requests), message)

    def _fail(self, request_ids, message: str) -> list:
        delivered = []
        for request_id in request_ids:
            request = self._requests.pop(request_id)
            outs = []
            for i, s in enumerate(request.seqs):
                if not s.finished:
                    s.finish_reason = "error"
                    outs.append(SeqOutput(i, finish_reason="error", error=message))
                self._retire(s)
            self._deliver(request, outs)
            self.observer.request_finished(request)
            delivered.append((request, outs))
        return delivered

    def _retire(self, s: Sequence) -> None:
        """Forget a finished or aborted sequence and give its blocks back."""
        if s in self.running:
            self.running.remove(s)
        elif s in self.waiting:
            self.waiting.remove(s)
        self.engine.free(s)
        self._owner.pop(s.seq_id, None)
        self._last_token.pop(s.seq_id, None)

    def _deliver(self, request: Request, outs: list) -> None:
        if not outs or request.on_output is None:
            return
        try:
            request.on_output(outs)
        except Exception:           # the receiver is gone (closed event loop, ...): stop its work
            log.exception("delivering request %s failed; aborting it", request.request_id)
            self.abort(request.request_id)

    # ---- planning ---------------------------------------------------------------------------
    def _new_blocks(self, s: Sequence, n: int) -> int:
        """Blocks `n` more tokens of `s` take (a sequence holds exactly ceil(len / block) blocks)."""
        ctx = self.kv.context_len(s.seq_id) if s.seq_id in self.kv else 0
        bs = self.block_size
        return -(-(ctx + n) // bs) - -(-ctx // bs)

    def _fit(self, s: Sequence, free: int) -> int:
        """Most new tokens of `s` that fit in its last block plus `free` more blocks."""
        ctx, bs = self.kv.context_len(s.seq_id), self.block_size
        return (-(-ctx // bs) + free) * bs - ctx

    def _leader_prefilling(self, s: Sequence) -> bool:
        """With prefix caching, the other choices of an n > 1 request wait (a step or a few)
        while its first choice prefills their common prompt, then find it cached: one prefill
        for all n instead of n."""
        if not self.engine.prefix_caching or s.params.prompt_logprobs is not None:
            return False
        request, index = self._owner[s.seq_id]
        leader = request.seqs[0]
        return (index > 0 and leader in self.running and leader.prompt_ids == s.prompt_ids
                and len(s.prompt_ids) > self.block_size and leader.num_computed < len(leader.prompt_ids))

    def _preempt_newest(self) -> None:
        s = self.running.pop()
        self.engine.preempt(s)
        self.waiting.appendleft(s)
        self.num_preemptions += 1
        self.observer.preempted()

    def _plan(self) -> list:
        for _ in range(len(self.running) + 1):
            plan = self._try_plan()
            if plan or not self.running:
                return plan
            self._preempt_newest()     # everything running is stuck on blocks: make room
        return []

    def _try_plan(self) -> list:
        kv = self.kv
        # 1. decodes, one token each; preempt the newest sequences until their blocks fit
        while True:
            decodes = [s for s in self.running if s.num_pending == 1]
            need = sum(self._new_blocks(s, 1) for s in decodes)
            if need <= kv.num_free_blocks or len(self.running) <= 1:
                break
            self._preempt_newest()
        free = kv.num_free_blocks
        budget = self.max_num_batched_tokens
        plan = []
        for s in decodes:
            if self._new_blocks(s, 1) <= free:
                plan.append((s, 1))
                free -= self._new_blocks(s, 1)
                budget -= 1
        # 2. prefill chunks of running sequences, in admission order
        promised = 0                   # blocks the rest of those prompts will still take
        for s in self.running:
            if s.num_pending <= 1:
                continue
            n = max(0, min(s.num_pending, budget, self._fit(s, free)))
            whole = self._new_blocks(s, s.num_pending)
            if n:
                plan.append((s, n))
                budget -= n
                free -= self._new_blocks(s, n)
            promised += whole - self._new_blocks(s, n)
        # 3. admit from the head of the queue while its whole prompt fits
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            s = self.waiting[0]
            if self._leader_prefilling(s):
                break                          # its prompt's blocks are about to be cached: share them
            whole = self.engine.blocks_for(len(s.all_ids))
            margin = self.watermark if self.running else 0
            if whole + promised + margin > free:
                break
            self.waiting.popleft()
            before = kv.num_free_blocks
            self.engine.admit(s)               # cached prefix blocks count as computed
            free -= before - kv.num_free_blocks   # idle cached blocks it took were counted free
            whole = self._new_blocks(s, s.num_pending)
            self.running.append(s)
            n = min(s.num_pending, budget)
            plan.append((s, n))
            budget -= n
            free -= self._new_blocks(s, n)
            promised += whole - self._new_blocks(s, n)
        return plan


class EngineThread(threading.Thread):
    """Runs `scheduler.step()` whenever there is work, off the caller's thread."""

    def __init__(self, scheduler: Scheduler, idle_wait: float = 0.5):
        super().__init__(name="ernie-hal-engine", daemon=True)
        self.scheduler, self.idle_wait = scheduler, idle_wait
        self._stopping = threading.Event()

    def start(self) -> None:
        # the caller's idle OpenMP pool (the thread that loaded the model) would make libgomp put
        # the engine's math threads to sleep at every parallel region (core/runtime/threads.py)
        release_openmp_pool()
        super().start()

    def run(self) -> None:
        sched = self.scheduler
        sched.engine.model.backend.bind_thread()     # the current device is per thread
        with torch.inference_mode():
            while not self._stopping.is_set():
                if not sched.wait_for_work(self.idle_wait) or self._stopping.is_set():
                    continue
                steps = sched.num_steps
                try:
                    sched.step()
                except Exception as e:          # a scheduler bug: fail what is in flight, keep serving
                    log.exception("scheduler step failed")
                    sched.fail_all(f"{type(e).__name__}: {e}")
                if sched.num_steps == steps:     # nothing could run (all waiting on an abort, ...): don't spin
                    self._stopping.wait(0.005)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.scheduler.wake()
        if self.is_alive():
            self.join(timeout)


# ---- sizing -------------------------------------------------------------------------------------
DEFAULT_KV_FRACTION = 0.5


def size_kv_cache(engine: Engine, max_num_seqs: int, num_blocks: int | None = None,
                  memory: int | None = None, fraction: float = DEFAULT_KV_FRACTION) -> KVCache:
    """Allocate the engine's KV cache once: `num_blocks`, or as many blocks as `memory` bytes
    hold, or by default enough for `max_num_seqs` full-length sequences but at most `fraction`
    of the device memory still free after the weights were loaded."""
    c, model = engine.config, engine.model
    per_block = KVCache.bytes_per_block(c.num_hidden_layers, engine.block_size, c.num_key_value_heads,
                                        c.head_dim, model.dtype)
    if num_blocks is None:
        if memory is None:
            full = max_num_seqs * engine.blocks_for(engine.max_model_len)
            free = model.backend.free_memory()
            memory = min(full * per_block, int(free * fraction)) if free else full * per_block
        num_blocks = int(memory) // per_block
    if num_blocks < 1:
        raise ValueError(f"the KV cache would hold no block: one block of {engine.block_size} tokens takes "
                         f"{per_block} bytes; give more --kv-cache-memory or --num-kv-blocks")
    if engine.kv is not None:
        raise ValueError("the engine already has a KV cache")
    return engine.ensure_kv(num_blocks)
