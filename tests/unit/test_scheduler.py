"""Scheduler on the tiny random MoE model (fp32, greedy), driven step by step without threads:
admission under a tiny KV cache (queueing, preemption, nothing lost), chunked prefill
interleaved with decodes, FIFO fairness, abort, a failing forward, the engine thread."""

import threading

import pytest

import ernie_hal
from ernie_hal.core.runtime.engine import Engine
from ernie_hal.core.runtime.sampling import SamplingParams
from ernie_hal.core.runtime.scheduler import EngineThread, Request, Scheduler


@pytest.fixture(scope="module")
def model():
    return ernie_hal.load("tiny-moe", device="cpu", dtype="fp32")


def greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def make(model, num_blocks, max_num_seqs=8, max_num_batched_tokens=64, prefix_caching=False):
    engine = Engine(model.model, block_size=16, prefix_caching=prefix_caching)
    engine.ensure_kv(num_blocks)
    return engine, Scheduler(engine, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)


def submit(engine, sched, rid, prompt, n_new, log=None):
    seq = engine.new_sequence(prompt, greedy(n_new))
    sink = log if log is not None else []
    sched.add(Request(rid, [seq], on_output=lambda outs: sink.extend((rid, o) for o in outs)))
    return seq


def drain(sched, limit=10_000, each=None):
    for _ in range(limit):
        if not sched.has_work():
            return
        sched.step()
        if each is not None:
            each()
    raise AssertionError("the scheduler did not finish")


def test_tiny_cache_queues_preempts_and_loses_nothing(model):
    # 12 blocks of 16 = 192 tokens; 8 requests of 40 + 30 tokens need 5 blocks each at the end
    engine, sched = make(model, num_blocks=12)
    prompts = [list(range(10 + i, 50 + i)) for i in range(8)]
    log, waited = [], []
    seqs = [submit(engine, sched, f"r{i}", p, 30, log) for i, p in enumerate(prompts)]
    drain(sched, each=lambda: waited.append(len(sched.waiting)))
    assert max(waited) > 0                         # requests did wait for blocks
    assert sched.num_preemptions > 0               # decodes outgrew the cache: recompute preemption
    assert engine.kv.num_free_blocks == 12         # every block came back
    for p, s in zip(prompts, seqs):
        assert s.finish_reason == "length" and len(s.output_ids) == 30
        assert s.output_ids == model.generate(p, max_new_tokens=30, temperature=0, ignore_eos=True).token_ids
    for i in range(8):                             # each token was delivered exactly once
        assert [o.token_id for rid, o in log if rid == f"r{i}"] == seqs[i].output_ids


def test_chunked_prefill_does_not_stall_running_streams(model):
    engine, sched = make(model, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32)
    short = submit(engine, sched, "short", [5, 6, 7], 40)
    for _ in range(3):
        sched.step()
    sizes = []
    real_step = engine.step

    def counting_step(seqs, max_tokens=None, num_tokens=None):
        sizes.append(sum(num_tokens))
        return real_step(seqs, max_tokens, num_tokens)

    engine.step = counting_step
    long_prompt = list(range(20, 220))              # 200 tokens: 7 chunks under a 32-token budget
    long = submit(engine, sched, "long", long_prompt, 1)
    while not long.output_ids:
        before = len(short.output_ids)
        sched.step()
        assert len(short.output_ids) == before + 1  # the running stream got its token every step
    assert len(sizes) >= 200 // 31 and max(sizes) <= 32
    assert long.output_ids[0] == int(model.logits(long_prompt)[-1].argmax())
    drain(sched)
    assert short.output_ids == model.generate([5, 6, 7], max_new_tokens=40, temperature=0,
                                              ignore_eos=True).token_ids


def test_fifo_order_and_no_overtaking_when_blocks_are_short(model):
    # A holds most of a 10-block cache; B (big prompt) is next in line; C (tiny) came after B:
    # C must not start before B even though it would fit first.
    engine, sched = make(model, num_blocks=10, max_num_seqs=4)
    first_token = {}
    log = []
    submit(engine, sched, "A", list(range(10, 90)), 8, log)        # 80 tokens -> 5-6 blocks
    sched.step()
    submit(engine, sched, "B", list(range(100, 180)), 8, log)      # needs 5 blocks for its prompt
    submit(engine, sched, "C", [1, 2, 3], 8, log)                  # needs 1
    step = 0

    def note():
        for rid, _ in log:
            first_token.setdefault(rid, step)

    while sched.has_work():
        sched.step()
        step += 1
        note()
    assert first_token["A"] <= first_token["B"] <= first_token["C"]
    assert engine.kv.num_free_blocks == 10


def test_equal_requests_start_in_arrival_order(model):
    engine, sched = make(model, num_blocks=64, max_num_seqs=2)
    order = []

    def first_token(i):
        return lambda outs: order.append(i) if i not in order else None

    for i in range(6):
        sched.add(Request(f"r{i}", [engine.new_sequence([7, 8, 9, i + 10], greedy(3))], on_output=first_token(i)))
    drain(sched)
    assert order == list(range(6))


def test_abort_frees_blocks_at_once(model):
    engine, sched = make(model, num_blocks=32)
    log = []
    submit(engine, sched, "x", list(range(30, 70)), 200, log)
    submit(engine, sched, "y", list(range(30, 40)), 200, log)     # waits behind nothing: runs too
    for _ in range(5):
        sched.step()
    assert engine.kv.num_free_blocks < 32
    sched.abort("x")
    sched.abort("y")
    sched.step()
    assert engine.kv.num_free_blocks == 32 and not sched.has_work()
    assert [o.finish_reason for _, o in log[-2:]] == ["abort", "abort"]


def test_a_failing_forward_fails_its_requests_not_the_scheduler(model):
    engine, sched = make(model, num_blocks=32)
    log = []
    real_step = engine.step
    engine.step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
    submit(engine, sched, "bad", [1, 2, 3], 4, log)
    sched.step()
    assert log[-1][1].finish_reason == "error" and "device lost" in log[-1][1].error
    assert engine.kv.num_free_blocks == 32
    engine.step = real_step
    ok = submit(engine, sched, "good", [1, 2, 3], 4, log)
    drain(sched)
    assert ok.finish_reason == "length" and len(ok.output_ids) == 4


def test_engine_thread_serves_requests_added_from_other_threads(model):
    engine, sched = make(model, num_blocks=64)
    thread = EngineThread(sched, idle_wait=0.05)
    thread.start()
    try:
        done = threading.Event()
        outs = []

        def on_output(batch):
            outs.extend(batch)
            if any(o.finish_reason for o in batch):
                done.set()

        seq = engine.new_sequence([3, 4, 5], greedy(6))
        sched.add(Request("t", [seq], on_output=on_output))
        assert done.wait(30)
        assert [o.token_id for o in outs] == seq.output_ids and len(seq.output_ids) == 6
    finally:
        thread.stop()
    assert not thread.is_alive()


def test_budget_must_cover_one_decode_per_sequence(model):
    engine = Engine(model.model)
    engine.ensure_kv(8)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(engine, max_num_seqs=16, max_num_batched_tokens=8)


def test_prefix_caching_under_preemption_gives_the_same_tokens(model):
    """8 prompts sharing a 40-token prefix in a cache that forces preemption: shared blocks,
    evictions and re-admissions change no token, and every block comes back."""
    engine, sched = make(model, num_blocks=12, prefix_caching=True)
    common = list(range(100, 140))
    prompts = [common + list(range(10 + i, 18 + i)) for i in range(8)]
    seqs = [submit(engine, sched, f"r{i}", p, 30) for i, p in enumerate(prompts)]
    drain(sched)
    assert sched.num_preemptions > 0
    stats = sched.stats()
    assert stats["prefix_cache_hits"] >= 7 * 32            # 2 full blocks of the prefix, reused
    assert engine.kv.num_free_blocks == 12
    for p, s in zip(prompts, seqs):
        assert s.output_ids == model.generate(p, max_new_tokens=30, temperature=0, ignore_eos=True).token_ids


def test_a_repeated_prompt_is_computed_once(model):
    engine, sched = make(model, num_blocks=32, prefix_caching=True)
    prompt = list(range(200, 250))                          # 50 tokens: 3 full blocks
    first = submit(engine, sched, "a", prompt, 4)
    drain(sched)
    steps = sched.num_steps
    second = submit(engine, sched, "b", prompt, 4)
    sched.step()                                            # admission + the one uncached token
    assert sched.stats()["prefix_cache_hits"] == 48 and second.num_computed == 50 and second.output_ids
    drain(sched)
    assert second.output_ids == first.output_ids and sched.num_steps - steps == 4
    # a prompt whose every token is cached still computes its last one (its logits are needed)
    third = submit(engine, sched, "c", prompt[:48], 2)
    drain(sched)
    assert third.output_ids == model.generate(prompt[:48], max_new_tokens=2, temperature=0,
                                              ignore_eos=True).token_ids


def test_n_choices_prefill_their_prompt_once(model):
    engine, sched = make(model, num_blocks=64, max_num_batched_tokens=32, prefix_caching=True)
    prompt = list(range(400, 480))                          # 80 tokens: 4 full blocks to share
    seqs = [engine.new_sequence(prompt, greedy(6)) for _ in range(4)]
    sched.add(Request("n4", seqs))
    drain(sched)
    assert sched.stats()["prefix_cache_hits"] == 3 * 64     # choices 2..4 found the first's prompt
    want = model.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    assert all(s.output_ids == want for s in seqs)
