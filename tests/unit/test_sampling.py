"""Sampling: penalties against their formulas, range checks, and their effect through the engine."""

import pytest
import torch

import ernie_hal
from ernie_hal.core.runtime.sampling import SamplingError, SamplingParams, apply_penalties, sample


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    got = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1], output_ids=[1, 3])
    assert got.tolist() == [1.0, -4.0, 1.0, -2.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, -1.0, 0.5]      # the caller's logits are untouched


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.zeros(5)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits, p, prompt_ids=[4, 4, 4], output_ids=[1, 1, 1, 2])
    assert got.tolist() == [0.0, -1.75, -0.75, 0.0, 0.0]       # 3 x 0.5 + 0.25, 1 x 0.5 + 0.25; prompt free


def test_negative_presence_penalty_encourages_repeats_and_greedy_sees_penalties():
    logits = torch.tensor([1.0, 0.9, 0.0])
    assert sample(logits, SamplingParams(temperature=0), None, output_ids=[1]) == 0
    assert sample(logits, SamplingParams(temperature=0, presence_penalty=-0.5), None, output_ids=[1]) == 1
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=2.0), None, prompt_ids=[0]) == 1


@pytest.mark.parametrize("kw,words", [
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2]"),
    (dict(repetition_penalty=0), "repetition_penalty must be in (0, 2]"),
])
def test_penalties_out_of_range_are_refused(kw, words):
    with pytest.raises(SamplingError, match=words.replace("[", r"\[").replace("(", r"\(")):
        SamplingParams(**kw).validate()


def test_frequency_penalty_through_the_engine_breaks_repetition():
    model = ernie_hal.load("tiny", device="cpu", dtype="fp32")
    kw = dict(max_new_tokens=40, temperature=0, ignore_eos=True)
    plain = model.generate([5, 6, 7], **kw).token_ids
    penalised = model.generate([5, 6, 7], frequency_penalty=2.0, **kw).token_ids
    assert penalised != plain
    # a strong frequency penalty makes the most repeated token of the plain run appear less often
    top = max(set(plain), key=plain.count)
    assert penalised.count(top) < plain.count(top)


def test_logprobs_are_the_models_log_softmax_with_the_top_alternatives():
    model = ernie_hal.load("tiny", device="cpu", dtype="fp32")
    prompt = [5, 6, 7]
    out = model.generate(prompt, max_new_tokens=5, temperature=0, ignore_eos=True, logprobs=3)
    assert len(out.logprobs) == 5
    ids = list(prompt)
    for token, (lp, top) in zip(out.token_ids, out.logprobs):
        want = torch.log_softmax(model.logits(ids)[-1].double(), -1)
        assert abs(lp - want[token].item()) < 1e-4
        assert [i for i, _ in top] == want.topk(3).indices.tolist() and top[0][0] == token   # greedy
        ids.append(token)
    assert model.generate(prompt, max_new_tokens=2, temperature=0).logprobs is None


def test_prompt_logprobs_score_each_prompt_token_also_in_chunks():
    model = ernie_hal.load("tiny-moe", device="cpu", dtype="fp32")
    prompt = list(range(10, 50))
    want = torch.log_softmax(model.logits(prompt).double(), -1)
    out = model.generate(prompt, max_new_tokens=1, temperature=0, prompt_logprobs=2)
    assert len(out.prompt_logprobs) == len(prompt) - 1
    for j, (lp, top) in enumerate(out.prompt_logprobs):
        assert abs(lp - want[j, prompt[j + 1]].item()) < 1e-4
        assert [i for i, _ in top] == want[j].topk(2).indices.tolist()
    # chunked prefill (16 tokens a step) scores the same tokens, each once
    eng = model.engine
    seq = eng.new_sequence(prompt, SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=0))
    eng.ensure_kv(eng.blocks_for(len(prompt) + 1)).add_sequence(seq.seq_id)
    while not seq.finished:
        eng.step([seq], max_tokens=16)
    eng.free(seq)
    assert [lp for lp, _ in seq.prompt_logprobs] == pytest.approx([lp for lp, _ in out.prompt_logprobs], abs=1e-5)


# ---- the batched sampler: the per-row sampler's ids, the whole batch at once --------------------
from ernie_hal.core.runtime.sampling import make_generator, sample_batch, token_logprobs  # noqa: E402

MIXED = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.8, seed=1),
         SamplingParams(temperature=1.0, top_k=5, top_p=1.0, seed=2), SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
         SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5),
         SamplingParams(temperature=1.2, top_p=0.95, presence_penalty=-0.5, repetition_penalty=0.8, seed=3),
         SamplingParams(temperature=0.5, top_k=1, seed=4), SamplingParams(temperature=2.0, top_p=0.5, seed=5)]


def test_batched_sampler_gives_the_per_row_samplers_ids_and_logprobs():
    """Eight rows of different params over 30 steps: greedy and seeded rows give exactly the ids
    of `sample` row by row (same generators, same penalties history), logprobs the same values."""
    g = torch.Generator().manual_seed(0)
    V = 300
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 7, 1, 12, 5, 9, 4, 6)]
    gens_a = [make_generator(p.seed) for p in MIXED]
    gens_b = [make_generator(p.seed) for p in MIXED]
    out_a, out_b = [[] for _ in MIXED], [[] for _ in MIXED]
    for step in range(30):
        logits = torch.randn(len(MIXED), V, generator=g) * 3
        ids, lps = sample_batch(logits, MIXED, gens_b, prompts, out_b, [2 if i % 2 else None for i in range(8)])
        for i, p in enumerate(MIXED):
            want = sample(logits[i], p, gens_a[i], prompts[i], out_a[i])
            out_a[i].append(want)
            out_b[i].append(ids[i])
            if i % 2:
                lp, alt = token_logprobs(logits[i], ids[i], 2)
                assert lps[i][0] == pytest.approx(lp, abs=1e-6) and [a for a, _ in lps[i][1]] == [a for a, _ in alt]
            else:
                assert lps[i] is None
    seeded_or_greedy = [i for i, p in enumerate(MIXED) if p.greedy or p.seed is not None]
    assert [out_b[i] for i in seeded_or_greedy] == [out_a[i] for i in seeded_or_greedy]
    assert all(0 <= t < V for row in out_b for t in row)


def test_batched_sampler_copies_no_logits_to_the_host(monkeypatch):
    """Only ids (and logprob rows asked for) leave the logits' device: no .cpu() of [B, V]."""
    logits = torch.randn(4, 100)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_k=10),
              SamplingParams(temperature=0.9, top_p=0.5, frequency_penalty=1.0), SamplingParams(temperature=1.0)]

    def refuse(self, *a, **k):
        raise AssertionError(f"a {tuple(self.shape)} tensor copied to the host")
    monkeypatch.setattr(torch.Tensor, "cpu", refuse)
    ids, _ = sample_batch(logits, params, [None] * 4, [[1, 2]] * 4, [[3, 3]] * 4)
    assert len(ids) == 4 and ids[0] == int(torch.argmax(logits[0]))


def test_top_k_one_and_tiny_top_p_are_greedy_in_the_batch():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=0)]
    ids, _ = sample_batch(logits, params, [None] * 3, [[]] * 3, [[]] * 3)
    assert ids == torch.argmax(logits, dim=-1).tolist()
