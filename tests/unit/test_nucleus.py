"""Top-p / min-p from a bounded candidate set (core/runtime/nucleus.py) against the full sort:
the same kept sets and probabilities bit for bit, and the same sampled ids, over many random
rows; ties, K >= V, top_p = 1 and min-p alone; the one-uniform draw against its probabilities."""

import pytest
import torch

from ernie_hal.core.runtime.nucleus import dense, draw, rank
from ernie_hal.core.runtime.sampling import SamplingParams, make_generator, sample, sample_batch

LADDER = (8, 64, 512)      # small K so that V = 3000 exercises every rung and the fallback


def _rows(g, S, V, ties=False):
    """Logits from peaked (scale 8: a nucleus of a few tokens) to flat (scale 0.3: the fallback);
    with `ties`, quantized so that many tokens share a value (at p_K too)."""
    scale = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.3])[torch.randint(0, 5, (S, 1), generator=g)]
    x = torch.randn(S, V, generator=g) * scale
    return x.round() if ties else x


def _picks(groups, u):
    out = torch.empty(len(u), dtype=torch.long)
    for grp in groups:
        out[grp.rows] = grp.ids.gather(1, draw(grp.cum, grp.kept, u[grp.rows])[:, None])[:, 0]
    return out


def _columns(S, g):
    top_p = torch.tensor([1.0, 0.99, 0.9, 0.8, 0.5, 0.1])[torch.randint(0, 6, (S,), generator=g)]
    min_p = torch.tensor([0.0, 0.0, 0.01, 0.1, 0.5])[torch.randint(0, 5, (S,), generator=g)]
    min_p = torch.where(top_p >= 1.0, torch.clamp(min_p, min=0.05), min_p)     # every row cuts something
    return top_p.double()[:, None], min_p.double()[:, None]


@pytest.mark.parametrize("ties", [False, True])
def test_candidates_give_the_full_sorts_kept_sets_and_probabilities_exactly(ties):
    g = torch.Generator().manual_seed(1 + ties)
    S, V = 64, 3000
    for _ in range(6):
        probs = torch.softmax(_rows(g, S, V, ties) / (0.2 + 1.5 * torch.rand(S, 1, generator=g)), dim=-1)
        top_p, min_p = _columns(S, g)
        fast = rank(probs, top_p, min_p, LADDER)
        full = rank(probs, top_p, min_p, ())
        assert torch.equal(dense(fast, S, V), dense(full, S, V))
        covered = torch.cat([f.rows for f in fast]).sort().values
        assert covered.tolist() == list(range(S))                   # every row once
        u = torch.rand(S, dtype=torch.float64, generator=g)
        assert torch.equal(_picks(fast, u), _picks(full, u))
    # the candidates did the work for the peaked rows: some groups are K wide, not V
    assert any(grp.ids.shape[1] < V for grp in fast)


def test_the_kept_set_is_the_rule_of_the_sort():
    """Sorted descending: keep the prefix before the first token whose predecessors cover top_p or
    whose p is under min_p x p_max; the kept tokens renormalized."""
    p = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]])
    one = lambda tp, mp: dense(rank(p, torch.tensor([[tp]], dtype=torch.float64),
                                    torch.tensor([[mp]], dtype=torch.float64), (2,)), 1, 5)[0]
    assert one(0.6, 0.0).tolist() == pytest.approx([0, 0.4 / 0.7, 0.3 / 0.7, 0, 0])     # 0.4 < 0.6 <= 0.7
    assert one(0.75, 0.0).tolist() == pytest.approx([0, 0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0])
    assert one(1.0, 0.3).tolist() == pytest.approx([0, 0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0])   # >= 0.12
    assert one(0.1, 0.0).tolist() == [0, 1, 0, 0, 0]          # the first token always stays


def test_ties_at_the_cut_keep_the_lower_ids_like_the_stable_sort():
    p = torch.tensor([[0.1, 0.2, 0.2, 0.2, 0.2, 0.1]])
    for ladder in ((3,), (4,), ()):
        got = dense(rank(p, torch.tensor([[0.5]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                         ladder), 1, 6)[0]
        assert (got > 0).tolist() == [False, True, True, True, False, False]     # ids 1, 2, 3 of the four tied


def test_candidates_at_least_the_vocabulary_fall_back_to_the_full_sort():
    p = torch.softmax(torch.randn(3, 40), dim=-1)
    top_p, min_p = torch.full((3, 1), 0.9, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
    groups = rank(p, top_p, min_p, (64, 1024))
    assert len(groups) == 1 and groups[0].ids.shape == (3, 40)
    assert torch.equal(dense(groups, 3, 40), dense(rank(p, top_p, min_p, ()), 3, 40))


def test_one_uniform_draws_each_token_with_its_probability():
    """Evenly spaced u give each kept token a share of draws equal to its probability (to 1 in N),
    and never a zero-probability token, also at u -> 1."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.125, 0.125, 0.0]])
    cum = torch.cumsum(probs, -1, dtype=torch.float64)
    N = 8000
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    picks = draw(cum.repeat(N, 1), torch.full((N,), 7), u)
    counts = torch.bincount(picks, minlength=7).tolist()
    assert counts == [0, 4000, 0, 2000, 1000, 1000, 0]
    edge = draw(cum, torch.tensor([7]), torch.tensor([1.0 - 2 ** -53], dtype=torch.float64))
    assert edge.tolist() == [5]


def test_sample_batch_gives_the_same_ids_with_candidates_or_the_full_sort():
    """Mixed rows (penalties, temperatures, top-k, top-p, min-p, seeded and not) over many steps:
    the seeded ids are the same whichever path a row took, and the oracle's."""
    g = torch.Generator().manual_seed(7)
    V = 3000
    params = [SamplingParams(temperature=t, top_p=tp, top_k=k, min_p=mp, seed=s, repetition_penalty=rp,
                             frequency_penalty=fp)
              for t, tp, k, mp, s, rp, fp in [
                  (0.7, 0.9, 0, 0.0, 1, 1.0, 0.0), (1.0, 0.8, 50, 0.0, 2, 1.3, 0.0),
                  (0.3, 0.95, 0, 0.05, 3, 1.0, 0.5), (1.5, 1.0, 0, 0.2, 4, 1.0, 0.0),
                  (1.0, 1.0, 20, 0.0, 5, 1.0, 0.0), (0.9, 0.5, 2000, 0.0, 6, 0.8, 0.0),
                  (1.0, 0.99, 0, 0.0, 7, 1.0, 0.0), (0.5, 0.7, 0, 0.0, None, 1.0, 0.0)]]
    prompts = [torch.randint(0, V, (9,), generator=g).tolist() for _ in params]
    gens = {name: [make_generator(p.seed) for p in params] for name in ("fast", "full", "oracle")}
    outs = {name: [[] for _ in params] for name in gens}
    for _ in range(25):
        logits = _rows(g, len(params), V)
        for name, ladder in (("fast", LADDER), ("full", ())):
            ids, _ = sample_batch(logits, params, gens[name], prompts, outs[name], candidates=ladder)
            for row, t in zip(outs[name], ids):
                row.append(t)
        for i, p in enumerate(params):
            outs["oracle"][i].append(sample(logits[i], p, gens["oracle"][i], prompts[i], outs["oracle"][i]))
    seeded = [i for i, p in enumerate(params) if p.seed is not None]
    assert [outs["fast"][i] for i in seeded] == [outs["full"][i] for i in seeded] == \
        [outs["oracle"][i] for i in seeded]


def test_min_p_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\]"):
        SamplingParams(min_p=1.5).validate()
