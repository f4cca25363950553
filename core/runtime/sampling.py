"""Sampling parameters and the token samplers (penalties, greedy, temperature, top-k, top-p, min-p,
seeded): `sample` for one row on the cpu (the oracle), `sample_batch` for a whole step where the
logits are (top-p and min-p from a bounded candidate set: core/runtime/nucleus.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .nucleus import CANDIDATES, draw, rank

MAX_LOGPROBS = 20


class SamplingError(ValueError):
    """A sampling parameter is out of range."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8      # Baidu's generation_config.json default; 0 = greedy
    top_p: float = 0.8
    top_k: int = 0                # 0 = off
    min_p: float = 0.0            # drop tokens less likely than min_p x the most likely; 0 = off
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
        if not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
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
    penalties), by a full sort: the oracle of `sample_batch`. Sampling runs on the CPU so a seed
    gives the same tokens whichever device computed the logits. The rule (nucleus.py): sorted by
    probability, keep the prefix before the first token that top-p or min-p drops; draw one
    uniform u and take the first kept token whose running sum exceeds u x the kept mass."""
    if params.penalized:
        logits = apply_penalties(logits.cpu(), params, prompt_ids, output_ids)
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    ids = torch.arange(probs.numel())
    if params.top_p < 1.0 or params.min_p > 0:
        probs, ids = torch.sort(probs, descending=True, stable=True)
    cum = probs.double().cumsum(dim=-1)
    drop = ((cum - probs) > params.top_p) if params.top_p < 1.0 else torch.zeros_like(probs, dtype=torch.bool)
    drop |= probs < params.min_p * probs.max()
    kept = int(drop.to(torch.uint8).argmax()) if drop.any() else probs.numel()
    u = torch.rand((), dtype=torch.float64, generator=generator)
    mass = cum[kept - 1]
    x = torch.minimum(u * mass, torch.nextafter(mass, torch.zeros_like(mass)))    # below the mass
    j = int(torch.searchsorted(cum, x[None], right=True))
    return int(ids[j])


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple:
    """(log p(token), [(id, log p)] of the `top` most likely ids) under softmax(logits)."""
    lp = torch.log_softmax(logits.float().cpu(), dim=-1)
    alternatives = []
    if top:
        values, ids = torch.topk(lp, top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(lp[token]), alternatives


# ---- the batched sampler: the whole batch on the logits' device -------------------------------
# One call per step over logits [B, V] wherever they were computed; only the token ids (and the
# requested logprobs) come back to the host. Row for row it applies the rule of `sample`: greedy
# ids are the same, and a seeded row draws its one uniform per token from its own cpu generator
# (only u travels; unseeded rows draw on the device), so seeded ids are the oracle's too. Top-p
# and min-p rows take their kept set from a bounded candidate set where that is provably the full
# sort's (core/runtime/nucleus.py); rows with neither draw over all V tokens in id order.
# A grammar mask (structured decoding) is applied to `logits` before this call: the seam is
# logits [B, V] on the device in, ids out.

def _column(values, dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)[:, None]


def _padded_ids(rows: list, device) -> torch.Tensor:
    """[B, L] int64 ids (rows padded with -1), one host-to-device copy."""
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device, non_blocking=True)


def _counts(ids: torch.Tensor, V: int) -> torch.Tensor:
    """[B, V] float32 occurrences of each id (padding -1 ignored)."""
    valid = ids >= 0
    counts = torch.zeros(ids.shape[0], V + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, torch.where(valid, ids, V), valid.float())
    return counts[:, :V]


def apply_penalties_batch(logits: torch.Tensor, params: list, prompt_ids: list, output_ids: list) -> torch.Tensor:
    """`apply_penalties` over every row of logits [B, V] at once (rows without penalties unchanged)."""
    scores = logits.float().clone()
    B, V = scores.shape
    dev = scores.device
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        seen = _counts(_padded_ids([list(prompt_ids[i]) + list(output_ids[i]) for i in rep], dev), V) > 0
        rp = _column([params[i].repetition_penalty for i in rep], torch.float32, dev)
        rows = torch.tensor(rep, device=dev)
        picked = scores[rows]
        scores[rows] = torch.where(seen, torch.where(picked > 0, picked / rp, picked * rp), picked)
    fp = [i for i, p in enumerate(params) if (p.frequency_penalty or p.presence_penalty) and output_ids[i]]
    if fp:
        counts = _counts(_padded_ids([list(output_ids[i]) for i in fp], dev), V)
        freq = _column([params[i].frequency_penalty for i in fp], torch.float32, dev)
        pres = _column([params[i].presence_penalty for i in fp], torch.float32, dev)
        rows = torch.tensor(fp, device=dev)
        scores[rows] = scores[rows] - (freq * counts + pres * (counts > 0).float())
    return scores


def _tempered(scores: torch.Tensor, params: list) -> torch.Tensor:
    """Temperature and top-k of `sample`, per row, on scores [B, V] (float32)."""
    B, V = scores.shape
    dev = scores.device
    scores = scores / _column([p.temperature for p in params], torch.float32, dev)
    ks = [p.top_k if p.top_k and p.top_k < V else 0 for p in params]
    if any(ks):
        top = torch.topk(scores, max(ks), dim=-1).values
        kth = top.gather(1, _column([max(k, 1) - 1 for k in ks], torch.long, dev))
        on = _column([k > 0 for k in ks], torch.bool, dev)
        scores = scores.masked_fill(on & (scores < kth), float("-inf"))
    return scores


def _uniforms(generators: list, device) -> torch.Tensor:
    """u ~ U[0, 1) float64 per row: from the row's cpu generator when seeded, else the device's."""
    u = torch.rand(len(generators), dtype=torch.float64, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:
        host = torch.stack([torch.rand((), dtype=torch.float64, generator=generators[i]) for i in seeded])
        u[torch.tensor(seeded, device=device)] = host.to(device, non_blocking=True)
    return u


def _draw_rows(probs: torch.Tensor, params: list, u: torch.Tensor, candidates) -> torch.Tensor:
    """Token ids [S] drawn from probabilities [S, V] (after temperature and top-k) with uniforms u."""
    S, V = probs.shape
    dev = probs.device
    out = torch.empty(S, dtype=torch.long, device=dev)
    filtered = [i for i, p in enumerate(params) if p.top_p < 1.0 or p.min_p > 0]
    plain = [i for i in range(S) if i not in set(filtered)]
    if plain:            # nothing to cut: the running sum over all V tokens in id order
        rows = torch.tensor(plain, device=dev)
        part = probs[rows]
        cum = part.double().cumsum(dim=-1)
        out[rows] = draw(cum, torch.full((len(plain),), V, device=dev), u[rows])
    if filtered:
        rows = torch.tensor(filtered, device=dev)
        top_p = _column([params[i].top_p for i in filtered], torch.float64, dev)
        min_p = _column([params[i].min_p for i in filtered], torch.float64, dev)
        for g in rank(probs[rows], top_p, min_p, candidates):
            at = rows[g.rows]
            out[at] = g.ids.gather(1, draw(g.cum, g.kept, u[at])[:, None])[:, 0]
    return out


def sample_batch(logits: torch.Tensor, params: list, generators: list, prompt_ids: list, output_ids: list,
                 logprobs: list | None = None, candidates=CANDIDATES) -> tuple:
    """Token ids for every row of float32 logits [B, V] (on any device): row i with params[i],
    generators[i] (None: unseeded) and its prompt/output ids for the penalties. `logprobs[i]`:
    None, or how many alternatives row i reports. `candidates`: the K nucleus.rank tries before
    a full sort (() = always the full sort; the same ids either way). Returns (ids: list[int],
    logprobs: list of token_logprobs tuples or None per row)."""
    B = logits.shape[0]
    logprobs = logprobs or [None] * B
    if any(p.penalized for p in params):
        scores = apply_penalties_batch(logits, params, prompt_ids, output_ids)
    else:
        scores = logits.float()
    ids = torch.argmax(scores, dim=-1)                     # greedy rows take these
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=scores.device)
        sub = [params[i] for i in sampled]
        probs = torch.softmax(_tempered(scores[rows], sub), dim=-1)
        u = _uniforms([generators[i] for i in sampled], scores.device)
        ids[rows] = _draw_rows(probs, sub, u, candidates)
    report = [i for i, k in enumerate(logprobs) if k is not None]
    lp_out = [None] * B
    if report:
        rows = torch.tensor(report, device=logits.device)
        lp = torch.log_softmax(logits[rows].float(), dim=-1)
        chosen = lp.gather(1, ids[rows][:, None])[:, 0]
        top = max(logprobs[i] for i in report)
        values, alt = torch.topk(lp, top, dim=-1) if top else (None, None)
        chosen = chosen.tolist()
        values, alt = (values.tolist(), alt.tolist()) if top else (None, None)
        for j, i in enumerate(report):
            k = logprobs[i]
            lp_out[i] = (chosen[j], list(zip(alt[j][:k], values[j][:k])) if k else [])
    return ids.tolist(), lp_out
