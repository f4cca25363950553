"""Top-p and min-p, from a bounded candidate set first, and the one-uniform draw of a token.

Sorting all V probabilities of a row every token (V = 103,424 for ERNIE) costs 30 ms or more on
a CPU; the nucleus of a real distribution is usually a few dozen tokens. So each row first takes
its K most likely tokens (torch.topk, K from CANDIDATES), and keeps that answer only where it is
provably the full sort's; the other rows try a larger K, then the full sort.

The kept set, for probabilities p [V] (after temperature and top-k) sorted by (p descending,
token id ascending), is the prefix before the first position j where
    (cum_j - p_j) > top_p        (the tokens before j already cover top_p; off when top_p >= 1)
    or p_j < min_p * p_0         (min-p: less likely than min_p times the most likely token),
with cum the float64 running sum. Why K candidates give the same prefix: all tokens more likely
than the K-th candidate's p_K are among the candidates, in the full sort's order, and the rest of
the first K positions hold p_K in both; so positions 0..K-1 carry the same values, the same
running sums (a sequential scan on the CPU; a device's parallel scan may round differently) and
the same decisions. Only which of the tokens tied at p_K sits where may differ. The candidates'
prefix is therefore the full sort's when it ends before the first p_K position, or when p_K is 0
(every token that can be drawn is certain).

A token is drawn by inverting the running sum with one uniform u per row: the first position
whose cum exceeds u * (the kept mass). Both paths give the same token for the same u, and a
seeded row costs one draw of its generator per token (Gumbel-max needs V exponentials: ~7 ms a
row here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CANDIDATES = (256, 1024, 4096)      # K tried in turn; a row whose kept set is wider gets the full sort


@dataclass
class Ranked:
    """Rows `rows` of a batch, each row's tokens best first (`ids`, `probs`; all V or K of them),
    the float64 running sum `cum` and how many positions are kept (`kept`, at least 1)."""
    rows: torch.Tensor       # [G] int64
    ids: torch.Tensor        # [G, C] int64
    probs: torch.Tensor      # [G, C] float32
    cum: torch.Tensor        # [G, C] float64
    kept: torch.Tensor       # [G] int64


def _prefix(probs: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> tuple:
    """(cum, kept) of sorted probs [G, C] under the rule above."""
    cum = probs.double().cumsum(dim=-1)      # (a dtype= argument is 3x slower on [G, V] here)
    drop = ((cum - probs) > top_p) & (top_p < 1.0)
    drop |= probs < min_p * probs[:, :1]
    C = probs.shape[1]
    kept = torch.where(drop.any(-1), drop.to(torch.uint8).argmax(-1), C)     # first drop, else all
    return cum, kept


def _by_prob_then_id(values: torch.Tensor, ids: torch.Tensor) -> tuple:
    """Candidates [G, K] from topk, reordered to the full sort's order (ties: lower id first)."""
    ids, by_id = ids.sort(dim=-1)
    values = values.gather(1, by_id)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, order)


def rank(p: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, candidates=CANDIDATES) -> list:
    """The kept prefix of every row of p [S, V] (top_p, min_p: float64 [S, 1] on p's device), as
    a list of Ranked groups covering rows 0..S-1 once each. `candidates=()`: the full sort only."""
    S, V = p.shape
    dev = p.device
    todo = torch.arange(S, device=dev)
    # a row without min-p needs at least top_p / p_max tokens: skip the K that cannot hold them
    need = torch.where(min_p[:, 0] > 0, 1.0, top_p[:, 0] / p.amax(-1).double()).tolist()
    groups = []
    for K in candidates:
        if K >= V or not len(todo):
            break
        fits = torch.tensor([need[i] <= K for i in todo.tolist()], device=dev)
        trying = todo[fits]
        if not len(trying):
            continue
        values, ids = _by_prob_then_id(*torch.topk(p[trying], K, dim=-1))
        cum, kept = _prefix(values, top_p[trying], min_p[trying])
        last = values[:, -1:]
        certain = (values > last).sum(-1)             # positions before the first tied with p_K
        exact = (kept <= certain) | (last[:, 0] == 0)
        if exact.any():
            groups.append(Ranked(trying[exact], ids[exact], values[exact], cum[exact], kept[exact]))
        # a row left over needs (top_p - its K tokens' mass) / p_K more tokens at least
        more = torch.where(min_p[trying, 0] > 0, 1.0, (top_p[trying, 0] - cum[:, -1]) / last[:, 0].double())
        for i, m in zip(trying[~exact].tolist(), more[~exact].tolist()):
            need[i] = K + m
        todo = torch.cat([todo[~fits], trying[~exact]])
    if len(todo):
        values, ids = torch.sort(p[todo], dim=-1, descending=True, stable=True)
        cum, kept = _prefix(values, top_p[todo], min_p[todo])
        groups.append(Ranked(todo, ids, values, cum, kept))
    return groups


def draw(cum: torch.Tensor, kept: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Position [G] of the token each row draws with uniform u [G] (float64): the first position
    whose running sum exceeds x = u * the kept mass. x stays below the mass, so that position is
    kept, and its running sum rose there, so its probability is not zero."""
    mass = cum.gather(1, (kept - 1)[:, None])
    x = torch.minimum(u[:, None] * mass, torch.nextafter(mass, torch.zeros_like(mass)))
    return torch.searchsorted(cum, x, right=True)[:, 0]


def dense(groups: list, S: int, V: int) -> torch.Tensor:
    """[S, V] float64: each row's final distribution (kept probabilities over the kept mass,
    zero elsewhere), in token order; what tests compare."""
    out = torch.zeros(S, V, dtype=torch.float64, device=groups[0].ids.device if groups else "cpu")
    for g in groups:
        C = g.ids.shape[1]
        on = torch.arange(C, device=g.ids.device)[None, :] < g.kept[:, None]
        mass = g.cum.gather(1, (g.kept - 1)[:, None])
        rows = torch.zeros(len(g.rows), V, dtype=torch.float64, device=out.device)
        rows.scatter_(1, g.ids, torch.where(on, g.probs.double() / mass, 0.0))
        out[g.rows] = rows
    return out
