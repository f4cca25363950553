"""Decode graphs (core/runtime/decode_graphs.py): replayed decode steps give the eager engine's tokens.

No GPU here, so the capturing backend records `fn` and replays it by calling it again into the
same output tensor: what a CUDA graph does, minus the driver. That checks what is ours: inputs
copied into the static buffers, padding rows kept in the scratch block, sizes, rebinding when the
KV cache is reallocated, and eager fallback with a reason. The real capture
(backends/_torch_cuda_like.py) runs in the GPU conformance suite.
"""

import dataclasses

import pytest
import torch

import ernie_hal
from ernie_hal.backends.cpu.backend import CpuBackend
from ernie_hal.core.runtime.decode_graphs import capture_sizes
from ernie_hal.core.runtime.sampling import SamplingParams


class ReplayingCpu(CpuBackend):
    """A CPU that says it can capture graphs."""

    def __init__(self, fail: str | None = None):
        super().__init__()
        self.caps = dataclasses.replace(self.caps, graphs=True)
        self.fail, self.captures = fail, 0

    def _capture_graph(self, fn):
        if self.fail:
            raise RuntimeError(self.fail)
        out = fn()
        self.captures += 1

        @torch.inference_mode()
        def replay():
            out.copy_(fn())

        return replay, out


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
    long = model.generate(PROMPTS[:2], max_new_tokens=60, **kw)   # needs a bigger cache
    assert model.engine.kv is not first_kv and model.engine.graphs.kv is model.engine.kv
    assert [c.token_ids for c in long] == [c.token_ids for c in eager.generate(PROMPTS[:2], max_new_tokens=60, **kw)]


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
