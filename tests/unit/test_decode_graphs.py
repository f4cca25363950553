"""Decode graphs (core/runtime/decode_graphs.py): replayed decode steps give the eager engine's tokens.

No GPU here, so the capturing backend records `fn` and replays it by calling it again into the
same output tensor: what a CUDA graph does, minus the driver. That checks what is ours: inputs
copied into the static buffers, padding rows kept in the scratch block, sizes, rebinding when the
KV cache is reallocated, and eager fallback with a reason. The real capture
(backends/_torch_cuda_like.py) runs in the GPU conformance suite.
"""

import dataclasses
import gc
import weakref

import pytest
import torch

import ernie_hal
from ernie_hal.backends.cpu.backend import CpuBackend
from ernie_hal.core.runtime.decode_graphs import capture_sizes
from ernie_hal.core.runtime.sampling import SamplingParams


class FakePool:
    """A graph memory pool: remembers (weakly) the graphs captured into it."""

    def __init__(self):
        self.graphs = []


class FakeGraph:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    @torch.inference_mode()
    def replay(self):
        self.out.copy_(self.fn())


class ReplayingCpu(CpuBackend):
    """A CPU that says it can capture graphs, with PyTorch's pool rule: capturing into a pool
    whose graphs have all been freed fails (the caching allocator asserts on a real GPU)."""

    def __init__(self, fail: str | None = None):
        super().__init__()
        self.caps = dataclasses.replace(self.caps, graphs=True)
        self.fail, self.captures = fail, 0

    def _graph_pool(self):
        return FakePool()

    def _capture_graph(self, fn, pool):
        if self.fail:
            raise RuntimeError(self.fail)
        if pool is not None and pool.graphs and all(r() is None for r in pool.graphs):
            raise RuntimeError("captured into a pool whose graphs were freed")
        graph = FakeGraph(fn, fn())
        if pool is not None:
            pool.graphs.append(weakref.ref(graph))
        self.captures += 1
        return graph.replay, graph.out


def _load(preset, backend, **kw):
    return ernie_hal.load(preset, device=backend, dtype="fp32", **kw)


@pytest.fixture(scope="module", params=["tiny", "tiny-moe"])
def pair(request):
    """(graphed, eager) models of one preset."""
    return _load(request.param, ReplayingCpu()), _load(request.param, "cpu")


PROMPTS = [[5, 17, 99], list(range(10, 40)), [300, 301], list(range(100, 117)), [7] * 20]


def test_capture_sizes_ladder():
    assert capture_sizes(1) == (1,)
    assert capture_sizes(3) == (1, 2, 4)
    assert capture_sizes(8) == (1, 2, 4, 8)
    assert capture_sizes(17) == (1, 2, 4, 8, 16, 24)
    assert capture_sizes(256)[-1] == 256


@pytest.mark.parametrize("n", [1, 3, 5])
def test_graphed_greedy_decode_equals_eager(pair, n):
    graphed, eager = pair
    kw = dict(max_new_tokens=10, temperature=0, ignore_eos=True)
    got = graphed.generate(PROMPTS[:n], **kw)
    want = eager.generate(PROMPTS[:n], **kw)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    graphs = graphed.engine.graphs
    padded = graphs.padded_size(n)
    assert padded in graphs.graphs and padded >= n
    assert graphed.engine.decode_graphs.startswith("on")
    assert got[0].metrics["decode_graphs"].startswith("on")


def test_batch_shrinking_as_sequences_finish_keeps_outputs(pair):
    """Sequences leave at different steps: the batch pads to 4, then 2, then 1."""
    graphed, eager = pair
    outs = []
    for model in (graphed, eager):
        eng = model.engine
        seqs = [eng.new_sequence(p, SamplingParams(max_new_tokens=m, temperature=0, ignore_eos=True))
                for p, m in zip(PROMPTS[:4], (3, 7, 5, 12))]
        kv = eng.ensure_kv(sum(eng.blocks_for(len(s.prompt_ids) + 12) for s in seqs))
        for s in seqs:
            kv.add_sequence(s.seq_id)
        running = list(seqs)
        while running:
            eng.step(running)
            running = [s for s in running if not s.finished]
        for s in seqs:
            eng.free(s)
        outs.append([s.output_ids for s in seqs])
    assert outs[0] == outs[1]
    assert {1, 2, 4} <= set(graphed.engine.graphs.graphs)


def test_padded_rows_write_only_the_scratch_block(pair):
    graphed, _ = pair
    graphed.generate(PROMPTS[:3], max_new_tokens=4, temperature=0, ignore_eos=True)
    eng = graphed.engine
    kv, scratch = eng.kv, eng.graphs.scratch_block
    assert scratch not in kv.allocator._free and all(b != scratch for bl in kv._blocks.values() for b in bl)
    # every block but the scratch one is back on the free list: padding leaked nothing
    assert kv.num_free_blocks == kv.num_blocks - 1


def test_kv_reallocation_rebinds_and_recaptures():
    backend = ReplayingCpu()
    model = _load("tiny", backend)
    eager = _load("tiny", "cpu")
    kw = dict(temperature=0, ignore_eos=True)
    model.generate(PROMPTS[0], max_new_tokens=4, **kw)
    first_kv = model.engine.kv
    replays = model.engine.graphs.replays
    long = model.generate(PROMPTS[:2], max_new_tokens=60, **kw)   # needs a bigger cache
    assert model.engine.kv is not first_kv and model.engine.graphs.kv is model.engine.kv
    assert [c.token_ids for c in long] == [c.token_ids for c in eager.generate(PROMPTS[:2], max_new_tokens=60, **kw)]
    # graphs stay on after the regrow: recaptured into a fresh pool, every decode step replayed
    m = model.engine.graph_metrics()
    assert m["decode_graphs_on"] and m["decode_graph_binds"] == 2 and m["decode_graph_eager_steps"] == 0
    assert model.engine.graphs.replays == replays + 59
    assert long[0].metrics["decode_graph_eager_steps"] == 0


def test_recapture_into_the_old_pool_would_fail():
    """The fake's pool rule is the one the fix is for: the old code's single pool trips it."""
    backend = ReplayingCpu()
    pool = backend.graph_pool()
    replay, _ = backend.capture_graph(lambda: torch.ones(2), pool)
    del replay
    gc.collect()
    with pytest.raises(RuntimeError, match="pool whose graphs were freed"):
        backend.capture_graph(lambda: torch.ones(2), pool)


def test_kv_regrow_frees_the_old_cache_before_allocating_the_new_one():
    model = _load("tiny", ReplayingCpu())
    eng = model.engine
    eng.ensure_kv(4)
    old = weakref.ref(eng.kv)
    seen = []
    real_alloc = model.backend.alloc

    def alloc(shape, dtype):
        gc.collect()
        seen.append(old() is None)
        return real_alloc(shape, dtype)

    model.backend.alloc = alloc
    eng.ensure_kv(64)
    assert seen and all(seen)          # every new KV tensor was allocated with the old cache gone
    assert eng.graphs.kv is eng.kv


def test_a_fallback_to_eager_is_counted_and_logged(caplog):
    why = "operation not permitted when stream is capturing"
    model = _load("tiny", ReplayingCpu(fail=why))
    with caplog.at_level("ERROR"):
        model.generate(PROMPTS[0], max_new_tokens=4, temperature=0, ignore_eos=True)
    m = model.engine.graph_metrics()
    assert not m["decode_graphs_on"] and m["decode_graph_eager_steps"] == 3 and why in m["decode_graphs_off_reason"]
    assert any("decode runs eager" in r.message and r.levelname == "ERROR" for r in caplog.records)


def test_batch_beyond_the_largest_graph_runs_eager():
    model = _load("tiny", ReplayingCpu())
    model.engine.graphs.sizes, model.engine.graphs.max_batch = (1, 2), 2     # as if max_num_seqs=2
    eager = _load("tiny", "cpu")
    kw = dict(max_new_tokens=5, temperature=0, ignore_eos=True)
    got = model.generate(PROMPTS[:3], **kw)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager.generate(PROMPTS[:3], **kw)]
    assert model.engine.graphs.replays == 0 and not model.engine.graphs.graphs


def test_failed_capture_falls_back_to_eager_with_the_reason():
    why = "operation not permitted when stream is capturing"
    model = _load("tiny-moe", ReplayingCpu(fail=why))
    eager = _load("tiny-moe", "cpu")
    kw = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
    assert model.generate(PROMPTS[1], **kw).token_ids == eager.generate(PROMPTS[1], **kw).token_ids
    assert model.engine.decode_graphs == f"off: capture failed at batch 1: RuntimeError: {why}"


def test_graphs_off_where_they_cannot_apply(tmp_path):
    assert _load("tiny", "cpu").engine.decode_graphs == "off: cpu:0 cannot capture device graphs"
    assert _load("tiny", ReplayingCpu(), eager=True).engine.decode_graphs == "off: turned off (eager)"
    staged = _load("tiny-moe", ReplayingCpu(), max_host_memory="24MiB", offload="experts")
    assert staged.engine.decode_graphs == "off: weights are staged from the checkpoint per step (offload)"
    staged.close()


def test_triton_kernels_under_replay_equal_eager():
    """The cuda backend's Triton kernels (emulated under the interpreter) on the static, padded
    inputs of a replay: full-width block tables, scratch-block rows, and the same ids as eager."""
    from ernie_hal.core.plugins.emulate import emulate, interpreter_problem
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    graphed_backend = emulate("cuda", "H100")
    graphed_backend.caps = dataclasses.replace(graphed_backend.caps, graphs=True)
    graphed_backend._capture_graph = ReplayingCpu._capture_graph.__get__(graphed_backend)
    graphed_backend._graph_pool = ReplayingCpu._graph_pool.__get__(graphed_backend)
    graphed_backend.fail = None
    graphed_backend.captures = 0
    graphed = _load("tiny-moe", graphed_backend)
    eager = _load("tiny-moe", emulate("cuda", "H100"))
    assert graphed.kernels["gqa_attention"] == "triton" and graphed.kernels["moe"] == "triton"
    kw = dict(max_new_tokens=4, temperature=0, ignore_eos=True)
    got = graphed.generate(PROMPTS[:3], **kw)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager.generate(PROMPTS[:3], **kw)]
    assert graphed.engine.graphs.replays == 3 and 4 in graphed.engine.graphs.graphs


def test_server_captures_every_size_before_serving_and_serves_the_same_tokens():
    from ernie_hal.core.runtime.scheduler import Request
    from ernie_hal.serve import build_server
    model, eager = _load("tiny-moe", ReplayingCpu()), _load("tiny-moe", "cpu")
    server = build_server(model, max_num_seqs=5, num_kv_blocks=64)
    engine = server.engine.engine
    assert sorted(engine.graphs.graphs) == [1, 2, 4, 8] and engine.graphs.replays == 0
    assert list(engine.graphs.graphs) == [8, 4, 2, 1]          # largest first, into one pool
    assert len(engine.graphs.pool.graphs) == 4
    scheduler = server.engine.scheduler
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    seqs = [engine.new_sequence(p, params) for p in PROMPTS]
    for i, s in enumerate(seqs):
        scheduler.add(Request(f"r{i}", [s]))
    while scheduler.has_work():
        scheduler.step()
    want = eager.generate(PROMPTS, max_new_tokens=6, temperature=0, ignore_eos=True)
    assert [s.output_ids for s in seqs] == [c.token_ids for c in want]
    assert engine.graphs.replays > 0
