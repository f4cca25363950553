"""Sampling parameters and the token sampler (penalties, greedy, temperature, top-k, top-p, seeded)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


MAX_LOGPROBS = 20


class SamplingError(ValueError):
    """A sampling parameter is out of range."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8      # Baidu's generation_config.json default; 0 = greedy
    top_p: float = 0.8
    top_k: int = 0                # 0 = off
    seed: int | None = None
    stop_token_ids: tuple = field(default=())
    ignore_eos: bool = False
    # OpenAI's penalties on the generated tokens: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # CTRL's / Hugging Face's on every token seen (prompt and output): a positive logit is divided
    # by it, a negative one multiplied; 1 = off
    repetition_penalty: float = 1.0
    # log-probabilities of each sampled token (of the model's distribution, before penalties and
    # temperature, as vLLM reports them) plus this many most likely alternatives; None = off
    logprobs: int | None = None
    # the same for every prompt token after the first (what each earlier position predicted)
    prompt_logprobs: int | None = None

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise SamplingError(f"repetition_penalty must be in (0, 2] (1 = off), got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise SamplingError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {k}")
        return self

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids=(), output_ids=()) -> torch.Tensor:
    """Penalised copy of float32 logits [V]: repetition over prompt + output, then frequency and
    presence over the output (vLLM's order)."""
    scores = logits.float().clone()
    V = scores.numel()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(list(prompt_ids) + list(output_ids), dtype=torch.long).unique()
        seen = seen[seen < V]
        picked = scores[seen]
        scores[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                   picked * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(list(output_ids), dtype=torch.long), minlength=V)[:V].float()
        scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return scores


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           prompt_ids=(), output_ids=()) -> int:
    """One token from float32 logits [V] of a sequence with these prompt and output ids (for the
    penalties). Sampling runs on the CPU so a seed gives the same tokens whichever device
    computed the logits."""
    if params.penalized:
        logits = apply_penalties(logits.cpu(), params, prompt_ids, output_ids)
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens before it already cover top_p (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.empty_like(scores).scatter_(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple:
    """(log p(token), [(id, log p)] of the `top` most likely ids) under softmax(logits)."""
    lp = torch.log_softmax(logits.float().cpu(), dim=-1)
    alternatives = []
    if top:
        values, ids = torch.topk(lp, top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(lp[token]), alternatives
