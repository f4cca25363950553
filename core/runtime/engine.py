"""Generation: batched prefill and decode over the block KV cache.

`Engine.step` runs one forward over a ragged batch of sequences (each contributes its
pending prompt chunk or its last sampled token) and samples for the sequences whose
pending tokens are all in the cache. `generate` drives it for a fixed set of prompts; the
server's scheduler drives the same step with sequences joining and leaving.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from .decode_graphs import DecodeGraphs, graphs_unavailable
from .kvcache import KVCache
from .step_inputs import PinnedUploader
from .executor import ErnieModel
from .grammar import mask_logits
from .sampling import SamplingParams, make_generator, sample_batch, token_logprobs


class GenerationError(ValueError):
    """A request the engine cannot serve as asked (too long, empty prompt, ...)."""


@dataclass(eq=False)     # identity: two choices of one prompt are different sequences
class Sequence:
    seq_id: int
    prompt_ids: list
    params: SamplingParams
    output_ids: list = field(default_factory=list)
    num_computed: int = 0                 # tokens whose K/V are in the cache
    finish_reason: str | None = None      # "stop" | "length" | "abort"
    generator: torch.Generator | None = None
    logprobs: list = field(default_factory=list)   # per output token, when params.logprobs is set
    prompt_logprobs: list = field(default_factory=list)  # for prompt tokens 1.. (params.prompt_logprobs)
    grammar: object | None = None         # a GrammarState (core/runtime/grammar.py): constrained output

    @property
    def all_ids(self) -> list:
        return self.prompt_ids + self.output_ids

    @property
    def num_pending(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepTimes:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    cached_tokens: int = 0          # prompt tokens found in the prefix cache (not computed)

    def as_dict(self) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens, "prefill_seconds": self.prefill_seconds,
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0,
            "decode_tokens": self.decode_tokens, "decode_seconds": self.decode_seconds,
            "decode_tokens_per_s": self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0,
            "prefix_cached_tokens": self.cached_tokens,
        }


class Engine:
    def __init__(self, model: ErnieModel, stop_token_ids=(), max_model_len: int | None = None,
                 block_size: int = 16, graphs: bool = True, graph_max_batch: int = 64,
                 prefix_caching: bool = False, prefill_chunk: int = 8192):
        """`graphs`: replay decode steps from captured device graphs where the backend and the
        weight store allow it (core/runtime/decode_graphs.py); False keeps every step eager.
        `prefix_caching`: sequences admitted with `admit` share the cached KV blocks of a
        common prefix (core/runtime/prefix_cache.py). `prefill_chunk`: `generate` prefills at
        most this many tokens per forward, so activations (and MoE intermediates) stay bounded
        on long prompts."""
        self.model = model
        self.config = model.config
        self.stop_token_ids = tuple(stop_token_ids) or (self.config.eos_token_id,)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.kv: KVCache | None = None
        self._ids = itertools.count()
        why_not = "turned off (eager)" if not graphs else graphs_unavailable(model.backend, model.weights)
        self.graphs = None if why_not else DecodeGraphs(model, graph_max_batch, self.max_model_len, block_size)
        self.graphs_off_reason = why_not

    @property
    def decode_graphs(self) -> str:
        """How decode runs: "on (...)" or "off: <reason>"."""
        return self.graphs.describe() if self.graphs is not None else f"off: {self.graphs_off_reason}"

    def graph_metrics(self) -> dict:
        """Decode-graph counters (replays, eager fallbacks, off reason) for metrics endpoints."""
        if self.graphs is None:
            return {"decode_graphs_on": False, "decode_graph_replays": 0, "decode_graph_eager_steps": 0,
                    "decode_graphs_captured": 0, "decode_graph_binds": 0,
                    "decode_graphs_off_reason": self.graphs_off_reason}
        return self.graphs.metrics()

    # ---- KV cache ---------------------------------------------------------------------------
    def ensure_kv(self, num_blocks: int) -> KVCache:
        """A cache with at least `num_blocks` free blocks (reallocated when too small and idle,
        then to twice the old size where that is at most twice what is asked, so a growing
        conversation reallocates, and drops its cached prefixes, rarely). With decode graphs,
        one more block is the scratch block of padded batch rows."""
        if self.kv is None or self.kv.num_free_blocks < num_blocks:
            if self.kv is not None:
                num_blocks = max(num_blocks, min(2 * self.kv.num_blocks, 2 * num_blocks))
                self.model.backend.release(self.kv.nbytes)
                # drop every reference to the old cache first: old and new never both on the device
                if self.graphs is not None:
                    self.graphs.unbind()
                self.kv = None
            c, b = self.config, self.model.backend
            extra = 1 if self.graphs is not None else 0
            self.kv = KVCache(c.num_hidden_layers, num_blocks + extra, self.block_size, c.num_key_value_heads,
                              c.head_dim, self.model.dtype, b.device, alloc=b.alloc,
                              prefix_caching=self.prefix_caching,
                              uploader=None if b.caps.unified_memory else PinnedUploader(b))
            if self.graphs is not None:
                self.graphs.bind(self.kv)
        return self.kv

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ---- requests ---------------------------------------------------------------------------
    def new_sequence(self, prompt_ids, params: SamplingParams, seed_offset: int = 0) -> Sequence:
        params.validate()
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise GenerationError("the prompt encodes to zero tokens; give at least one token of input")
        vocab = self.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise GenerationError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                f"exceeds the model's context of {self.max_model_len} tokens; shorten the prompt or lower "
                f"max_new_tokens")
        seed = None if params.seed is None else params.seed + seed_offset
        return Sequence(next(self._ids), prompt_ids, params, generator=make_generator(seed))

    # ---- one forward ------------------------------------------------------------------------
    def step(self, seqs: list, max_tokens: int | None = None, num_tokens: list | None = None) -> list:
        """One forward over `seqs` (unfinished, registered in self.kv). Each takes all its pending
        tokens, or a chunk of them when `max_tokens` caps the step, or exactly `num_tokens[i]`
        (a scheduler's plan, at most its pending count). Returns [(seq, token_id)] for the
        sequences that produced a token."""
        kv = self.kv
        budget = max_tokens or sum(s.num_pending for s in seqs)
        ids, counts, taken = [], [], []
        for i, s in enumerate(seqs):
            n = min(s.num_pending, budget if num_tokens is None else num_tokens[i])
            if n <= 0:
                continue
            ids.extend(s.all_ids[s.num_computed:s.num_computed + n])
            counts.append(n)
            taken.append(s)
            budget -= n
        if not taken:
            return []
        meta = kv.prepare([s.seq_id for s in taken], counts)
        ends = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.long) - 1
        ready = [i for i, (s, n) in enumerate(zip(taken, counts)) if s.num_pending == n]
        ids = torch.tensor(ids, dtype=torch.long, device=self.model.backend.device)
        scoring = [i for i, s in enumerate(taken)
                   if s.params.prompt_logprobs is not None and s.num_computed < len(s.prompt_ids) - 1]
        logits = None
        if scoring:   # every row's logits: each prompt position scores the next prompt token
            every = self.model.forward(ids, meta, kv).cpu()
            self._score_prompts(taken, counts, scoring, every)
            logits = every[ends[ready]] if ready else None
        elif self.graphs is not None and len(ready) == len(taken) == len(ids):   # a pure decode step
            logits = self.graphs.run(ids, meta, kv)
        if logits is None:    # also a chunk no sequence finishes: its K/V must be written
            logits = self.model.forward(ids, meta, kv, ends[ready].to(self.model.backend.device))
            logits = logits if ready else None
        out = []
        for s, n in zip(taken, counts):
            s.num_computed += n
            if kv.needs_commit(s.seq_id):      # blocks filled this step become shareable
                kv.commit(s.seq_id, s.all_ids)
        if logits is not None:        # sampled where the logits are: only the ids come back
            rows = [taken[i] for i in ready]
            # the grammar step: forbidden tokens at -inf on the device; logprobs stay the model's
            masked = mask_logits(logits, [s.grammar for s in rows])
            tokens, lps = sample_batch(logits if masked is None else masked, [s.params for s in rows],
                                       [s.generator for s in rows], [s.prompt_ids for s in rows],
                                       [s.output_ids for s in rows],
                                       [s.params.logprobs if s.grammar is None else None for s in rows])
            for r, (s, token, lp) in enumerate(zip(rows, tokens, lps)):
                if s.grammar is not None and s.params.logprobs is not None:
                    lp = token_logprobs(logits[r], token, s.params.logprobs)
                if lp is not None:
                    s.logprobs.append(lp)
                s.output_ids.append(token)
                self._check_finished(s, token)
                out.append((s, token))
        return out

    @staticmethod
    def _score_prompts(taken, counts, scoring, logits) -> None:
        """Log p of prompt token j + 1 from row j's logits, for the sequences in `scoring`. A
        sequence prefilled again after preemption keeps the entries it has (no duplicates)."""
        starts = [0, *itertools.accumulate(counts)]
        for i in scoring:
            s = taken[i]
            for j in range(counts[i]):
                pos = s.num_computed + j
                if pos + 1 < len(s.prompt_ids) and len(s.prompt_logprobs) == pos:
                    s.prompt_logprobs.append(token_logprobs(logits[starts[i] + j], s.prompt_ids[pos + 1],
                                                            s.params.prompt_logprobs))

    def admit(self, s: Sequence) -> int:
        """Register `s` in the KV cache, reusing cached blocks of its prefix where prefix caching
        is on (not when its prompt is to be scored: every position must then be computed).
        Returns the tokens found cached; they count as computed."""
        share = self.prefix_caching and s.params.prompt_logprobs is None
        s.num_computed = self.kv.add_sequence(s.seq_id, s.all_ids if share else None)
        return s.num_computed

    def free(self, s: Sequence) -> None:
        """Return a sequence's KV blocks (finished, aborted or preempted); safe to call twice."""
        if self.kv is not None and s.seq_id in self.kv:
            self.kv.free_sequence(s.seq_id)

    def preempt(self, s: Sequence) -> None:
        """Drop a running sequence's KV (recompute preemption): its prompt and the tokens it has
        produced so far are prefilled again when it resumes, so no output is lost or repeated."""
        self.free(s)
        s.num_computed = 0

    def _check_finished(self, s: Sequence, token: int) -> None:
        stops = s.params.stop_token_ids or self.stop_token_ids
        if s.grammar is not None:
            if not s.grammar.accept(token):    # the grammar allowed no token: cut, as max_tokens would
                s.finish_reason = "length"
                return
            if s.grammar.finished():       # the structure is complete: it ends here, ignore_eos or not
                s.finish_reason = "stop"
                return
        if token in stops and not s.params.ignore_eos:
            s.finish_reason = "stop"
        elif len(s.output_ids) >= s.params.max_new_tokens or len(s.all_ids) >= self.max_model_len:
            s.finish_reason = "length"

    # ---- a fixed batch ----------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams, on_token=None, grammar=None) -> tuple:
        """Generate for every prompt (lists of ids). `on_token(index, token_id)` streams.
        `grammar()`, when given, makes each sequence's GrammarState (constrained output).
        Returns (sequences, StepTimes)."""
        seqs = [self.new_sequence(p, params, seed_offset=i) for i, p in enumerate(prompts)]
        for s in seqs if grammar is not None else ():
            s.grammar = grammar()
        need = sum(self.blocks_for(len(s.prompt_ids) + params.max_new_tokens) for s in seqs)
        kv = self.ensure_kv(need)
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        times = StepTimes()
        for s in seqs:
            times.cached_tokens += self.admit(s)
        try:
            running = list(seqs)
            times.prefill_tokens += sum(len(s.prompt_ids) for s in seqs) - times.cached_tokens
            while running:
                prefilling = any(s.num_computed < len(s.prompt_ids) for s in running)
                t0 = time.perf_counter()
                produced = self.step(running, max_tokens=self.prefill_chunk if prefilling else None)
                dt = time.perf_counter() - t0
                if prefilling:      # long prompts: several chunks of at most prefill_chunk tokens
                    times.prefill_seconds += dt
                else:
                    times.decode_tokens += len(produced)
                    times.decode_seconds += dt
                for s, token in produced:
                    if on_token is not None:
                        on_token(index[s.seq_id], token)
                running = [s for s in running if not s.finished]
        finally:
            for s in seqs:
                kv.free_sequence(s.seq_id)
        return seqs, times
