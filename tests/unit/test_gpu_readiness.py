"""What a first GPU run would trip over in the staging engine and the threads, checked on the cpu
with a discrete device whose streams and events are recorded instead of run: a prefetch hit
waits on its copy's event, a restarted ring waits on compute, every thread binds the device,
pinned memory is counted as the allocator rounds it, copies are timed with device events."""

import dataclasses
import threading

import pytest
import torch

import ernie_hal
from ernie_hal.backends.cpu.backend import CpuBackend
from ernie_hal.core.memory.offload import OffloadedWeights
from ernie_hal.core.memory.placement import HOST, plan
from ernie_hal.core.model.checkpoint_reader import Checkpoint
from ernie_hal.core.model.defaults import make_random_model
from ernie_hal.core.model.graph import build
from ernie_hal.kernels.reference.moe import moe_experts

from .test_offload import MiB, STREAM_MOE, ckpt_dir  # noqa: F401 - the module's checkpoint fixture
from .test_placement import DiscreteFake

COPY_MS = 2.0       # what the fake device says each copy took
# tensor sizes that are not powers of two (hidden 192), so the pinned allocator rounds them
ODD_MOE = dataclasses.replace(STREAM_MOE, hidden_size=192, intermediate_size=720, moe_intermediate_size=200)


@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory):
    return make_random_model(ODD_MOE, str(tmp_path_factory.mktemp("odd") / "odd-moe"), seed=2)


class Event:
    def __init__(self, stream, n):
        self.stream, self.n = stream, n

    def __repr__(self):
        return f"<event {self.n} on {self.stream}>"


class RecordingDevice(DiscreteFake):
    """A discrete device on cpu tensors: a copy stream, events and waits logged in order, the
    pinned allocator's power-of-two rounding, timing events, and which threads bound it."""

    def __init__(self, budget=None):
        super().__init__(budget)
        self.caps = dataclasses.replace(self.caps, streams=True)
        self.log, self.bound, self.timed, self._n = [], set(), 0, 0
        self._lock = threading.Lock()

    def _new_stream(self):
        return "copy"

    def _record_event(self, stream):
        with self._lock:
            self._n += 1
            e = Event(stream or "compute", self._n)
            self.log.append(("record", e.stream, e))
        return e

    def _wait_event(self, event, stream):
        with self._lock:
            self.log.append(("wait", stream or "compute", event))

    def _sync_event(self, event):
        pass

    def _bind_thread(self):
        with self._lock:
            self.bound.add(threading.current_thread().name)

    def _pinned_footprint(self, nbytes):
        return 1 << max(0, nbytes - 1).bit_length()

    def _timing_event(self, stream):
        return Event(stream or "compute", -1)

    def _elapsed_seconds(self, start, end):
        with self._lock:
            self.timed += 1
        return COPY_MS / 1000

    def compute_waits(self):
        return [e for kind, stream, e in self.log if kind == "wait" and stream == "compute"]


def _store(path, device, **kw):
    ckpt = Checkpoint.open(path)
    graph = build(ckpt.config, untied_head=True)
    p = plan(graph, device, device_budget=10 * MiB, host_budget=24 * MiB, mode="auto", dtype=torch.bfloat16)
    return graph, p, OffloadedWeights(graph, ckpt, device, torch.bfloat16, p, **kw)


def test_prefetch_hit_waits_on_the_copy_event_even_when_its_ticket_is_done(ckpt_dir):
    device = RecordingDevice()
    _, _, store = _store(ckpt_dir, device, prefetch=True)
    h = torch.randn(1, STREAM_MOE.hidden_size).to(torch.bfloat16)
    w = torch.full((1, 4), 0.25, dtype=torch.bfloat16)
    store.routed_experts(1, h, w, torch.tensor([[4, 5, 6, 7]]), moe_experts)   # prefetches layer 2: 4..7
    store.drain()                       # every prefetch ticket done: the copies are *queued*
    tickets = {e: store.slot_ticket[store.cache.slot_of[(2, e)]] for e in (4, 5)}
    assert all(t is not None and t.done() for t in tickets.values())
    before = len(device.compute_waits())
    store.routed_experts(2, h, w, torch.tensor([[4, 5, 8, 9]]), moe_experts)   # 4 and 5 are hits
    assert store.cache.stats()["prefetch_used"] == 2
    waited = device.compute_waits()[before:]
    assert all(any(e is t.event for e in waited) for t in tickets.values())
    store.close()


def test_a_restarted_ring_waits_for_the_compute_already_queued(ckpt_dir):
    device = RecordingDevice()
    _, _, store = _store(ckpt_dir, device)
    afters = []
    submit = store.stager.submit
    store.stager.submit = lambda parts, priority, after=None: afters.append(after) or submit(parts, priority, after)
    store.embedding(torch.tensor([1, 2]))
    store.layer(0)
    store.layer(1)                      # the step stops here (a kernel raised)
    afters.clear()
    n = len(device.log)
    store.embedding(torch.tensor([3]))
    store.layer(0)                      # out of order: the ring restarts from layer 0
    recorded = [e for kind, stream, e in device.log[n:] if kind == "record" and stream == "compute"]
    assert afters and all(a is not None and a in recorded for a in afters[:len(store.ring)])
    store.close()


def test_reader_and_engine_threads_bind_the_device(ckpt_dir):
    device = RecordingDevice()
    _, _, store = _store(ckpt_dir, device)
    store.drain()
    assert {"ernie-hal-reader-0", "ernie-hal-reader-1"} <= device.bound
    store.close()

    class BindingCpu(CpuBackend):
        bound = set()

        def _bind_thread(self):
            self.bound.add(threading.current_thread().name)

    from ernie_hal.serve import build_server
    server = build_server(ernie_hal.load("tiny", device=BindingCpu()), max_num_seqs=2, num_kv_blocks=16)
    server.engine.start()
    server.engine.stop()
    assert "ernie-hal-engine" in BindingCpu.bound


def test_pinned_memory_counts_the_allocators_rounding(odd_ckpt):
    device = RecordingDevice()
    _, p, store = _store(odd_ckpt, device)
    assert p.tier_bytes(HOST) > 0 and p.pinned_rounding > 0
    # the plan's pinned total is exactly what the store pinned, rounded as the allocator rounds
    ring = p.pinned_chunks * device.pinned_footprint(p.pinned_chunk_bytes)
    assert store.host_bytes + ring == p.host_total <= 24 * MiB
    assert store.stats()["pinned_host_bytes"] == store.host_bytes
    store.close()


def test_offload_copy_time_comes_from_device_events(ckpt_dir):
    device = RecordingDevice()
    _, _, store = _store(ckpt_dir, device)
    store.drain()
    seconds = store.stager.copy_seconds
    assert device.timed > 0 and seconds == pytest.approx(device.timed * COPY_MS / 1000)
    store.close()
